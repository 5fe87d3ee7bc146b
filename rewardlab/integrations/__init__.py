"""Bridges to other engines (Ray Data). Each module imports its engine itself, only when used."""
