"""prepare: read the dataset (params `data`, conf/data/), verify it, normalize, split, save `.npy`
and record what it made (dataset.json: class names, image shape, counts, a hash of the content).

IDX datasets: each file comes from the first source in `data.sources` whose decompressed bytes
match the pinned SHA-256, so a recompressed local copy (Debian's package) and the upstream mirrors
agree. Image folders: ROOT/CLASS/PICTURE, every picture decoded and resized to `data.image_size`.
"""

from __future__ import annotations

from wardrobe.common import (
    WardrobeError,
    run_main,
)
from wardrobe.data.preparation import (
    prepare,
)
from wardrobe.outputs import PREPARED_DIR
from wardrobe.params import PARAMS_FILE, DataParams, PrepareParams, load_section, untracked_folders


def main() -> None:
    data, params = load_section(DataParams), load_section(PrepareParams)
    if problems := untracked_folders(data):
        raise WardrobeError(f"{PARAMS_FILE}: {problems[0]}")
    info = prepare(data, params, PREPARED_DIR)
    sizes = ", ".join(f"{split} {count}" for split, count in info.counts.items())
    print(f"prepare: wrote {PREPARED_DIR}/ ({info.name}: {sizes}; {len(info.class_names)} classes)")


if __name__ == "__main__":
    run_main(main)
