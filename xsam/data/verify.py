"""`xsam-convert --verify`: check every shard of a converted tree against its manifest.

For each completely converted split (one with a manifest) every shard the manifest lists must exist
with the manifest's size and sha256. A split whose manifest cannot be read is reported too.
"""

from __future__ import annotations

from xsam.data import storage
from xsam.data.shards import file_sha256, list_splits, manifest_location, read_manifest, split_dir


def verify_split(output: str, dataset: str, split: str) -> tuple[int, list[str]]:
    """(shards checked, problems) for one split; each problem names the shard and what is wrong."""
    location = manifest_location(output, dataset, split)
    try:
        manifest = read_manifest(location)
    except (ValueError, OSError) as e:
        return 0, [f"{location}: unreadable manifest ({type(e).__name__}: {e})"]
    if manifest is None:
        return 0, [f"{location}: no manifest"]
    problems = []
    for shard in manifest.shards:
        tar = storage.join(split_dir(output, dataset, split), shard.name)
        try:
            if not storage.exists(tar):
                problems.append(f"{tar}: missing")
            elif (size := storage.size(tar)) != shard.bytes:
                problems.append(f"{tar}: {size} bytes, the manifest says {shard.bytes}")
            elif (digest := file_sha256(tar)) != shard.sha256:
                problems.append(f"{tar}: sha256 {digest[:16]}..., the manifest says {shard.sha256[:16]}...")
        except OSError as e:
            problems.append(f"{tar}: unreadable ({e})")
    return len(manifest.shards), problems


def verify_tree(output: str) -> tuple[int, list[str]]:
    """(shards checked, problems) over every converted split under `output`."""
    checked, problems = 0, []
    for dataset, split in list_splits(output):
        n, bad = verify_split(output, dataset, split)
        checked += n
        problems += bad
    return checked, problems
