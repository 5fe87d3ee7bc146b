"""Self-contained HTML reports (images embedded, no external files)."""

from .gallery import GalleryImage, GallerySection, render_gallery, write_gallery

__all__ = ["GalleryImage", "GallerySection", "render_gallery", "write_gallery"]
