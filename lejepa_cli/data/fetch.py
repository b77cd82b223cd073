"""`lejepa data fetch NAME --out DIR`: get a standard dataset into the form `prepare` reads.

    fetch("fashion-mnist", Path("data"))  ->  data/fashion-mnist          IDX .gz files
    fetch("mnist", Path("data"))          ->  data/mnist                  IDX .gz files
    fetch("cifar10", Path("data"))        ->  data/cifar-10-batches-bin   binary batches
    fetch("cifar100", Path("data"))       ->  data/cifar-100-binary       binary batches
    fetch("imagenette", Path("data"))     ->  data/imagenette2-160        train/ and val/ class folders
    (also "imagenette-320")

A local copy comes first (Debian's `dataset-fashion-mnist` package installs Fashion-MNIST under
/usr/share/datasets/fashion-mnist). Otherwise files are downloaded to `NAME.part` with resume
(HTTP Range), checked against the published MD5, and renamed into place. Archives are extracted
member by member, refusing the whole archive if any member is absolute, climbs out with `..`, is a
link or a device. Offline, fetch stops with one line saying where to put the files by hand.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from lejepa_cli.errors import UserError

MARKER = ".lejepa-fetch.json"


@dataclass(frozen=True)
class Remote:
    url: str  # mirror folder
    files: tuple[tuple[str, str], ...]  # (file name, "md5:<hex>" or "sha256:<hex>")
    folder: str  # the folder `prepare` reads, relative to --out
    archive: bool = False  # the files are tar archives that hold `folder`
    local: tuple[str, ...] = ()  # folders that may already hold the files
    idx_counts: tuple[tuple[str, int], ...] = ()  # IDX files: (prefix, image count), to check local copies


_IDX_COUNTS = (("train", 60000), ("t10k", 10000))

DATASETS: dict[str, Remote] = {
    "mnist": Remote(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (  # the MD5s torchvision's MNIST dataset checks (torchvision 0.28, datasets/mnist.py)
            ("train-images-idx3-ubyte.gz", "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "md5:d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "md5:9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "md5:ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        "mnist",
        local=("/usr/share/datasets/mnist",),
        idx_counts=_IDX_COUNTS,
    ),
    "fashion-mnist": Remote(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (  # the MD5s published in the Fashion-MNIST README (torchvision 0.28 checks the same)
            ("train-images-idx3-ubyte.gz", "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "md5:25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "md5:bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "md5:bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        "fashion-mnist",
        local=("/usr/share/datasets/fashion-mnist",),
        idx_counts=_IDX_COUNTS,
    ),
    "cifar10": Remote(
        "https://www.cs.toronto.edu/~kriz/",
        # SHA-256s of the archives and of ImageNette's below: the url_checksums files that
        # tensorflow-datasets 4.9.10 ships, recorded from real downloads.
        (("cifar-10-binary.tar.gz", "sha256:c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),),
        "cifar-10-batches-bin",
        archive=True,
    ),
    "cifar100": Remote(
        "https://www.cs.toronto.edu/~kriz/",
        (("cifar-100-binary.tar.gz", "sha256:58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),),
        "cifar-100-binary",
        archive=True,
    ),
    "imagenette": Remote(
        "https://s3.amazonaws.com/fast-ai-imageclas/",
        (("imagenette2-160.tgz", "sha256:64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5"),),
        "imagenette2-160",
        archive=True,
    ),
    "imagenette-320": Remote(
        "https://s3.amazonaws.com/fast-ai-imageclas/",
        (("imagenette2-320.tgz", "sha256:569b4497c98db6dd29f335d1f109cf315fe127053cedf69010d047f0188e158c"),),
        "imagenette2-320",
        archive=True,
    ),
}
ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar-100": "cifar100", "imagenette-160": "imagenette", "imagenette2-160": "imagenette",
    "imagenette2-320": "imagenette-320",
}


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


# ---------------------------------------------------------------------------------------------
# Checksums


def _split_checksum(expected: str) -> tuple[str, str]:
    algo, _, digest = expected.rpartition(":")
    algo = algo or {32: "md5", 64: "sha256"}.get(len(digest), "")
    if algo not in ("md5", "sha256"):
        raise ValueError(f"checksum '{expected}' is neither md5 nor sha256")
    return algo, digest.lower()


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _check_idx_gz(path: Path, counts: dict[str, int]) -> str | None:
    """None if `path` is a complete, CRC-valid gzipped IDX file with the expected count."""
    prefix = path.name.split("-")[0]
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(8)
            ndim = header[3] if len(header) == 8 else 0
            dims = [int.from_bytes(header[4:8], "big")] + [int.from_bytes(f.read(4), "big") for _ in range(ndim - 1)]
            size = 4 + 4 * ndim
            while block := f.read(1 << 22):  # reading to the end checks the gzip CRC
                size += len(block)
    except (OSError, EOFError) as e:
        return f"unreadable ({e})"
    expected_n = counts.get(prefix)
    if header[:3] != b"\x00\x00\x08" or (expected_n and dims[0] != expected_n):
        return f"unexpected IDX header (dims {dims})"
    n_bytes = 4 + 4 * ndim + math.prod(dims)
    return None if size == n_bytes else f"holds {size} bytes, expected {n_bytes}"


# ---------------------------------------------------------------------------------------------
# Download with resume


def _download(url: str, part: Path, progress: bool, hint: str) -> None:
    """Download `url` to `part`, continuing from the bytes already there when the server allows."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "lejepa-cli"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is already whole
            return
        raise UserError(f"download of {url} failed (HTTP {e.code} {e.reason}); {hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot download {url} ({reason}); offline? {hint}") from None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with response:
        resumed = have and response.status == 206 and (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-")
        if response.status == 206 and not resumed:  # a range we did not ask for: start over
            part.unlink()
            return _download(url, part, progress, hint)
        if not resumed:
            have = 0  # the server ignored the Range header and sends the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=_console(), disable=not progress) as bar, open(part, "ab" if resumed else "wb") as f:
            task = bar.add_task(part.name.removesuffix(".part"), total=total, completed=have)
            try:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.advance(task, len(block))
            except OSError as e:
                raise UserError(f"download of {url} was interrupted ({e}); re-run to resume it") from None


def _obtain(remote: Remote, fname: str, expected: str, dest: Path, base_url: str | None,
            local_dirs: Sequence[Path], progress: bool, hint: str) -> dict:
    """Put a verified `fname` at `dest`; returns how it was obtained and checked."""
    algo, digest = _split_checksum(expected)
    if dest.is_file() and file_digest(dest, algo) == digest:
        return {"from": "already present", "check": f"{algo} matches"}
    part = dest.with_name(dest.name + ".part")
    for folder in local_dirs:
        local = Path(folder) / fname
        if not local.is_file():
            continue
        shutil.copyfile(local, part)
        if file_digest(part, algo) == digest:
            os.replace(part, dest)
            return {"from": str(local), "check": f"{algo} matches"}
        if remote.idx_counts and _check_idx_gz(part, dict(remote.idx_counts)) is None:
            # Debian re-compresses the .gz files, so the published MD5 cannot match; the
            # gzip CRC and the IDX header still prove the content whole.
            os.replace(part, dest)
            return {"from": str(local), "check": "gzip CRC and IDX header (re-compressed local copy)"}
        part.unlink()
    url = (base_url or remote.url).rstrip("/") + "/" + fname
    _download(url, part, progress, hint)
    got = file_digest(part, algo)
    if got != digest:
        part.unlink()
        raise UserError(
            f"checksum mismatch for {fname} from {url}: expected {algo} {digest}, got {got}; "
            "the file was removed, re-run to download it again"
        )
    os.replace(part, dest)
    return {"from": url, "check": f"{algo} matches"}


# ---------------------------------------------------------------------------------------------
# Safe extraction


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract a tar(.gz) into `dest`; refuses the whole archive (before writing anything) if a
    member is absolute, contains `..`, is a symbolic or hard link, a device or a FIFO.
    Returns the top-level names extracted."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{archive} is not a readable tar archive ({e}); delete it and fetch again") from None
    with tar:
        members = tar.getmembers()
        for m in members:
            parts = PurePosixPath(m.name).parts
            if not m.name or m.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise UserError(f"refusing to extract {archive.name}: member '{m.name}' points outside the target folder")
            if m.issym() or m.islnk():
                raise UserError(f"refusing to extract {archive.name}: member '{m.name}' is a link")
            if not (m.isfile() or m.isdir()):
                raise UserError(f"refusing to extract {archive.name}: member '{m.name}' is a device, FIFO or other special file")
        staging = dest / f".extract-{archive.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for m in members:
            parts = [p for p in PurePosixPath(m.name).parts if p != "."]
            if not parts:
                continue
            target = staging.joinpath(*parts)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as f:  # type: ignore[union-attr]
                shutil.copyfileobj(src, f, 1 << 20)
    top = sorted(p.name for p in staging.iterdir())
    # Never delete what the user has: a file or folder already at a top-level name stops the
    # extraction (a link there is only a name: it is replaced, never followed).
    clashes = [name for name in top if (dest / name).exists() and not (dest / name).is_symlink()]
    if clashes:
        shutil.rmtree(staging)
        raise UserError(f"{dest / clashes[0]} already exists and is not a finished fetch; "
                        f"move it away (or delete it) and fetch again")
    for name in top:  # move into place only once everything extracted
        final = dest / name
        if final.is_symlink():
            final.unlink()
        os.replace(staging / name, final)
    staging.rmdir()
    return top


# ---------------------------------------------------------------------------------------------


def fetch(
    name: str,
    out: Path,
    *,
    base_url: str | None = None,
    progress: bool = True,
    checksums: dict[str, str] | None = None,
    local_dirs: Sequence[Path] | None = None,
    rerun: str | None = None,
) -> Path:
    """Fetch dataset `name` under `out`; returns the folder to give `lejepa data prepare`.

    `base_url` replaces the mirror; `checksums` ({file name: "md5:<hex>" or "sha256:<hex>"})
    replaces the published ones (tests serve generated files); `local_dirs` replaces the list of
    folders searched for an existing copy. `rerun` is the command an offline error tells the
    user to run again once the file is in place (default: this fetch).
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise UserError(f"unknown dataset '{name}' (choose from: {', '.join(DATASETS)})")
    remote = DATASETS[key]
    out = Path(out).expanduser().resolve()
    target = out / remote.folder
    if (target / MARKER).is_file():
        return target
    downloads = out if remote.archive else target
    downloads.mkdir(parents=True, exist_ok=True)
    sums = {**dict(remote.files), **(checksums or {})}
    local = [Path(p) for p in (remote.local if local_dirs is None else local_dirs)]
    record = {}
    for fname, _ in remote.files:
        dest = downloads / fname
        again = rerun or f"lejepa data fetch {key} --out {out}"
        hint = f"download {(base_url or remote.url).rstrip('/')}/{fname} by hand to {dest} and re-run `{again}`"
        record[fname] = _obtain(remote, fname, sums[fname], dest, base_url, local, progress, hint)
    if remote.archive:
        for fname, _ in remote.files:
            safe_extract(downloads / fname, out)
        if not target.is_dir():
            raise UserError(f"the {key} archive did not contain the folder {remote.folder}")
        for fname, _ in remote.files:
            (downloads / fname).unlink()  # extracted and verified; the archive is no longer needed
    (target / MARKER).write_text(json.dumps({"dataset": key, "files": record}, indent=1) + "\n")
    return target
