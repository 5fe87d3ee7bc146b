"""Byte-level and fault-injection tests of everything rewardlab writes, and of untrusted checkpoints."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from rewardlab.errors import CheckpointError, ImageLoadError
from rewardlab.io import atomic
from rewardlab.io.png_text import PNG_SIGNATURE, get_png_text, make_chunk, read_chunks, set_png_text


def _png_with_everything(path):
    """A PNG with eXIf (orientation), pHYs, iCCP, tEXt, zTXt and iTXt chunks."""
    info = PngInfo()
    info.add_text("Comment", "keep me")
    info.add_text("parameters", "steps: 20", zip=True)
    info.add_itxt("Title", "naïve ☃", lang="en")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    Image.new("RGB", (24, 16), (10, 200, 30)).save(path, pnginfo=info, exif=exif.tobytes(), dpi=(300, 300),
                                                    icc_profile=b"\0" * 128)
    return path


def _other_chunks(path, keyword=b"rewardlab:m"):
    return [raw for kind, payload, raw in read_chunks(path.read_bytes(), str(path))
            if not (kind == b"tEXt" and payload.split(b"\0")[0] == keyword)]


def test_png_metadata_keeps_every_other_chunk_byte_for_byte(tmp_path):
    path = _png_with_everything(tmp_path / "a.png")
    before = _other_chunks(path)
    kinds = {raw[4:8] for raw in before}
    assert {b"eXIf", b"pHYs", b"iCCP", b"tEXt", b"zTXt", b"iTXt"} <= kinds
    set_png_text(path, "rewardlab:m", "1.250000")
    set_png_text(path, "rewardlab:m", "2.500000")  # replaces, never duplicates
    assert _other_chunks(path) == before
    assert get_png_text(path)["rewardlab:m"] == "2.500000"
    with Image.open(path) as image:
        assert image.getexif()[0x0112] == 6 and image.size == (24, 16)


def test_animated_png_and_fake_png_are_refused(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    apng = tmp_path / "anim.png"
    frames[0].save(apng, save_all=True, append_images=frames[1:])
    original = apng.read_bytes()
    with pytest.raises(ImageLoadError, match="animated PNG"):
        set_png_text(apng, "rewardlab:m", "1")
    assert apng.read_bytes() == original
    fake = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(fake, format="JPEG")
    with pytest.raises(ImageLoadError, match="not a PNG"):
        set_png_text(fake, "rewardlab:m", "1")
    broken = bytearray(original)
    broken[40] ^= 0xFF  # corrupt a chunk payload: CRC no longer matches
    (tmp_path / "broken.png").write_bytes(bytes(broken))
    with pytest.raises(ImageLoadError, match="bad CRC"):
        set_png_text(tmp_path / "broken.png", "rewardlab:m", "1")


def test_cli_write_metadata_png_faithful_and_sidecar_for_others(tmp_path, tiny_checkpoint):
    from click.testing import CliRunner

    from rewardlab.cli import cli

    png = _png_with_everything(tmp_path / "a.png")
    before = _other_chunks(png, b"rewardlab:tiny.safetensors")
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green")]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    anim_bytes = (tmp_path / "anim.png").read_bytes()
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "c.jpg")
    result = CliRunner().invoke(cli, ["score", "-p", "x", str(png), str(tmp_path / "anim.png"), str(tmp_path / "c.jpg"),
                                      "-m", tiny_checkpoint, "--write-metadata", "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    scores = [json.loads(line)["score"] for line in result.stdout.splitlines()]
    assert _other_chunks(png, b"rewardlab:tiny.safetensors") == before
    assert float(get_png_text(png)["rewardlab:tiny.safetensors"]) == pytest.approx(scores[0], abs=1e-6)
    assert (tmp_path / "anim.png").read_bytes() == anim_bytes and "animated PNG" in result.output
    assert json.loads((tmp_path / "anim.png.rewardlab.json").read_text())["tiny.safetensors"] == scores[1]
    assert json.loads((tmp_path / "c.jpg.rewardlab.json").read_text())["tiny.safetensors"] == scores[2]


WRITE_POINTS = ["write", "fsync", "chmod", "replace"]


@pytest.mark.parametrize("point", WRITE_POINTS)
def test_a_kill_at_any_write_point_leaves_the_old_file(tmp_path, monkeypatch, point):
    target = tmp_path / "out.json"
    target.write_text('{"old": true}\n')

    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed

    if point == "write":
        def writer(handle):
            handle.write('{"new": ')
            raise Killed
    else:
        def writer(handle):
            handle.write('{"new": true}\n')
        monkeypatch.setattr(os, point, die)
    with pytest.raises(Killed), atomic.atomic_write(target) as handle:
        writer(handle)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left behind


def test_a_kill_during_png_metadata_leaves_a_readable_original(tmp_path, monkeypatch):
    path = _png_with_everything(tmp_path / "a.png")
    original = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        set_png_text(path, "rewardlab:m", "1")
    monkeypatch.undo()
    assert path.read_bytes() == original and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_real_sigkill_mid_write_leaves_old_or_new(tmp_path):
    """A child process rewrites a file in a loop and is SIGKILLed at random moments."""
    target = tmp_path / "state.json"
    atomic.write_json(target, {"n": -1, "pad": "x" * 100_000})
    script = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from rewardlab.io.atomic import write_json\n"
              f"n = 0\nwhile True:\n    write_json({str(target)!r}, {{'n': n, 'pad': 'x' * 100_000}}); n += 1\n")
    for delay in (0.05, 0.11, 0.23, 0.37):
        child = subprocess.Popen([sys.executable, "-c", script])
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        data = json.loads(target.read_text())  # never torn
        assert data["pad"] == "x" * 100_000


def test_published_versions_are_all_or_nothing(tmp_path, monkeypatch):
    root = tmp_path / "state"
    first = atomic.new_version_dir(root, "step")
    (first / "model.bin").write_bytes(b"A" * 10)
    (first / "optim.bin").write_bytes(b"a" * 10)
    atomic.publish_version(root, first, "step-1")
    second = atomic.new_version_dir(root, "step")
    (second / "model.bin").write_bytes(b"B" * 10)
    # killed before the optimizer file and before publishing: the previous state stays current
    assert atomic.current_version(root).name == "step-1"
    assert (atomic.current_version(root) / "optim.bin").read_bytes() == b"a" * 10
    (second / "optim.bin").write_bytes(b"b" * 10)
    monkeypatch.setattr(atomic, "write_text", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        atomic.publish_version(root, second, "step-2")
    monkeypatch.undo()
    assert (atomic.current_version(root) / "model.bin").read_bytes() == b"A" * 10
    third = atomic.new_version_dir(root, "step")
    (third / "model.bin").write_bytes(b"C" * 10)
    atomic.publish_version(root, third, "step-3")
    assert atomic.current_version(root).name == "step-3"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


# -- untrusted checkpoints ----------------------------------------------------------------------------

def _embedded(tmp_path, spec_dict, tensors=None):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "evil.safetensors"
    save_file(tensors or {"x": torch.zeros(1)}, str(path), metadata={"rewardlab_spec": json.dumps(spec_dict)})
    return path


def _tiny_dict():
    from rewardlab.testing import tiny_blip_spec

    return tiny_blip_spec().to_dict()


def test_embedded_spec_cannot_name_downloads_or_file_names(tmp_path, monkeypatch):
    import rewardlab
    from rewardlab.io import hub

    calls = []
    monkeypatch.setattr(hub, "_fetch", lambda source: calls.append(source) or pytest.fail("download attempted"))
    evil = _tiny_dict()
    evil["architecture"] = "clip"
    evil["options"] = {"clip": {"vision": {}, "text": {}, "projection_dim": 8}, "output": "aesthetic",
                       "backbone": {"kind": "url", "location": "https://evil.example/x.bin", "filename": "../../../x"}}
    with pytest.raises(CheckpointError, match="unknown option"):
        rewardlab.load(_embedded(tmp_path, evil))
    evil = _tiny_dict()
    evil["backbone_sources"] = [{"kind": "url", "location": "https://evil.example/x", "filename": "../../../x"}]
    evil["sources"] = [{"kind": "url", "location": "https://evil.example/y", "filename": "../y"}]
    with pytest.raises(CheckpointError, match="does not match the model"):  # sources dropped, keys checked
        rewardlab.load(_embedded(tmp_path, evil))
    assert calls == []


def test_url_file_names_cannot_leave_the_cache():
    from rewardlab.errors import WeightsNotFoundError
    from rewardlab.io.hub import safe_file_name

    for name in ("../x.pth", "a/b.pth", ".hidden", "..", "x\0y"):
        with pytest.raises(WeightsNotFoundError):
            safe_file_name(name)
    assert safe_file_name("CycleReward-T2I.pth") == "CycleReward-T2I.pth"


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["options"]["vision"].update(width=10**6), "vision.width must be an integer in 8..4096"),
    (lambda d: d["options"]["vision"].update(depth=True), "vision.depth"),
    (lambda d: d["options"].update(head="exec"), "head must be 'linear' or 'gelu'"),
    (lambda d: d["options"].update(std=float("nan")), "std"),
    (lambda d: d["preprocess"].update(size=10**7), "preprocess.size"),
    (lambda d: d["preprocess"].update(mean=[0.5, 0.5]), "preprocess.mean"),
    (lambda d: d["preprocess"].update(resize="lanczos9"), "preprocess.resize"),
    (lambda d: d.update(max_tokens=10**9), "max_tokens"),
    (lambda d: d.update(architecture="os.system"), "unknown architecture"),
    (lambda d: d.update(evil_field=1), "unknown spec field"),
    (lambda d: d["options"]["text"].update(hidden_size=33), "not divisible"),
])
def test_embedded_spec_fields_are_validated(tmp_path, mutate, needle):
    import rewardlab

    spec = _tiny_dict()
    mutate(spec)
    with pytest.raises(CheckpointError, match=needle):
        rewardlab.load(_embedded(tmp_path, spec))


def test_huge_embedded_spec_costs_no_memory(tmp_path):
    """An 800-byte file describing a ViT of width 4096 and depth 64 (~51 GB of weights) is refused by the key
    check before any parameter is allocated."""
    spec = _tiny_dict()
    spec["options"]["vision"].update(width=4096, depth=64, heads=32, image_size=224, patch_size=16)
    spec["options"]["text"].update(hidden_size=4096, layers=64, heads=32, intermediate_size=16384)
    path = _embedded(tmp_path, spec)
    assert path.stat().st_size < 2000
    code = (f"import resource, rewardlab\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    rewardlab.load({str(path)!r})\nexcept rewardlab.CheckpointError as e:\n    print('refused', e)\n"
            f"print('grew_mb', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert "refused" in out.stdout and "missing keys" in out.stdout, out.stdout + out.stderr
    grew = float(out.stdout.split("grew_mb")[1])
    assert grew < 100, f"loading the huge spec grew RSS by {grew:.0f} MB"


def test_pickle_with_code_is_refused(tmp_path):
    import rewardlab

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": Boom()}))
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        rewardlab.load("imagereward-v1.0", checkpoint=path)
    assert not (tmp_path / "pwned").exists()


def test_offline_hub_fails_fast(tmp_path, monkeypatch):
    """With the hub unreachable (connection refused) and nothing cached, missing weights fail in seconds."""
    import time

    code = ("import time, rewardlab\nt = time.perf_counter()\ntry:\n    rewardlab.load('cyclereward-t2i')\n"
            "except rewardlab.WeightsNotFoundError as e:\n    print('error', e)\nprint('seconds', time.perf_counter() - t)")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=os.getcwd())
    assert "cannot get weights for cyclereward-t2i" in out.stdout, out.stdout + out.stderr
    assert float(out.stdout.split("seconds")[1]) < 5.0
    assert time.perf_counter() - started < 60


def test_png_chunk_helpers_round_trip():
    chunk = make_chunk(b"tEXt", b"k\0v")
    assert struct.unpack(">I", chunk[-4:])[0] == zlib.crc32(b"tEXtk\0v") & 0xFFFFFFFF
    data = PNG_SIGNATURE + make_chunk(b"IHDR", b"\0" * 13) + make_chunk(b"IEND", b"")
    assert [k for k, _, _ in read_chunks(data, "x")] == [b"IHDR", b"IEND"]
    assert resource.getpagesize() > 0


def test_republishing_a_name_swaps_it_in_one_step(tmp_path, monkeypatch):
    """Publishing ``final`` again exchanges the folders atomically: a kill right after the swap, before
    the old folder is removed, leaves the new version complete at ``final`` (never a missing folder)."""
    root = tmp_path / "lora"
    first = atomic.new_version_dir(root, "final")
    (first / "weights.bin").write_bytes(b"old")
    atomic.publish_version(root, first, "final")
    second = atomic.new_version_dir(root, "final")
    (second / "weights.bin").write_bytes(b"new")
    synced = []

    def killed_after_swap(folder):  # the first fsync is the new folder's, the second follows the swap
        synced.append(folder)
        if len(synced) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(atomic, "fsync_dir", killed_after_swap)
    with pytest.raises(KeyboardInterrupt):
        atomic.publish_version(root, second, "final")
    monkeypatch.undo()
    assert (root / "final" / "weights.bin").read_bytes() == b"new"
    assert (second / "weights.bin").read_bytes() == b"old"  # the old version, hidden, removed next time
    third = atomic.new_version_dir(root, "final")
    (third / "weights.bin").write_bytes(b"newer")
    atomic.publish_version(root, third, "final")
    assert (root / "final" / "weights.bin").read_bytes() == b"newer"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "final"]


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("A")
    (b / "x").write_text("B")
    atomic.exchange(a, b)
    assert (a / "x").read_text() == "B" and (b / "x").read_text() == "A"


def test_republishing_without_exchange_support_moves_the_old_version_aside(tmp_path, monkeypatch):
    root = tmp_path / "lora"
    for content in (b"old", b"new"):
        folder = atomic.new_version_dir(root, "final")
        (folder / "weights.bin").write_bytes(content)
        atomic.publish_version(root, folder, "final")
        monkeypatch.setattr(atomic, "exchange", lambda a, b: (_ for _ in ()).throw(OSError("unsupported")))
    assert (root / "final" / "weights.bin").read_bytes() == b"new"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "final"]
