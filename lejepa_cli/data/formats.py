"""Which capability a source on disk belongs to: trajectory files and folders (world models) are
told apart from image sources here, in the data layer, so image code can refuse them with a clear
message and the CLI can hand them to lejepa_cli.world without the data layer importing it.

    is_trajectory_source("runs/two-room-data")   # a folder from `lejepa world simulate`: True
    is_trajectory_file(Path("episodes.h5"))        # LeWM / stable-worldmodel HDF5: True
    is_trajectory_file(Path("pusht.lance"))        # a stable-worldmodel Lance dataset (a folder): True
"""

from __future__ import annotations

from pathlib import Path


from lejepa_cli.data.shards import is_trajectory_folder

H5_SUFFIXES = (".h5", ".hdf5")
LANCE_SUFFIX = ".lance"  # a Lance dataset is a folder: data/, _versions/, _transactions/
FRAME_KEYS = ("frames", "pixels")


def is_trajectory_file(path: Path) -> bool:
    """An .h5/.hdf5 file, a .lance dataset folder, or an .npz with a frames/pixels array (image .npz
    files use other keys; one without actions is still a trajectory file, so the user hears what
    is missing)."""
    if path.suffix.lower() == LANCE_SUFFIX:
        return path.is_dir()
    if not path.is_file():
        return False
    if path.suffix.lower() in H5_SUFFIXES:
        return True
    if path.suffix.lower() != ".npz":
        return False
    from lejepa_cli.data.inputs import npz_names
    from lejepa_cli.errors import UserError

    try:
        keys = set(npz_names(path))
    except UserError:
        return False  # the reader of the file says what is wrong with it
    return bool(keys & set(FRAME_KEYS))


def is_trajectory_source(source: str | Path) -> bool:
    """A prepared trajectory folder, a trajectory .npz (frames + actions), an .h5/.hdf5 file or a
    .lance dataset: data for a world preset (lejepa_cli.world reads it), not for an image preset."""
    path = Path(source).expanduser()
    if path.is_dir() and path.suffix.lower() != LANCE_SUFFIX:
        return is_trajectory_folder(path)
    return is_trajectory_file(path)
