"""prepare: read the dataset (params `data`), verify, normalize, split and save it as `.npy` in
data/prepared/ (src/wardrobe/data/preparation.py has the IDX and picture-folder paths)."""

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
