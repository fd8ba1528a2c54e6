"""A reader whose worker dies on one sample, for the tests of a shard task that keeps crashing.

It must be importable by Ray workers (tests/ on their PYTHONPATH), hence a module of its own. The death
is real (SIGKILL of the worker process), as a native crash in a decoder or the rasteriser would be."""

import os
import signal

from xsam.data.readers.coco_panoptic import CocoPanopticReader


class DyingReader(CocoPanopticReader):
    """CocoPanopticReader whose process dies when it converts the sample with source id `victim`."""

    victim = ""

    def convert(self, item):
        if item.source_id == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().convert(item)


def swap_reader(reader, victim: str) -> DyingReader:
    """A DyingReader with the state of `reader` (same entry, split, settings)."""
    dying = DyingReader.__new__(DyingReader)
    dying.__dict__.update(reader.__dict__)
    dying.victim = victim
    return dying
