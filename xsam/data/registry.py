"""The dataset registry: one YAML file per dataset in datasets_registry/, validated by pydantic.

An entry names its source format; the reader of that format owns the schema of the entry's
`splits` (which files a split reads) and `options`. So a new dataset in a known format is a new
YAML file and nothing else, and a typo in it is reported with its file and field.

    name: refcoco                        # = the file's stem; [a-z0-9_]
    task: referring_seg                  # xsam.data.schema.Task
    format: refer                        # a reader in xsam.data.readers.READERS
    root: refer_seg                      # relative to the data root, or an absolute path / s3:// URI
    splits:
      train: {refs: refcoco/refs(unc).p, instances: refcoco/instances.json,
              images: ../coco/train2014, ref_split: train}
      val:   {..., role: eval}
    label_space: coco_instances_80
    stages: [s3]
    metrics: [ciou, giou]
    license: Apache-2.0 (annotations); COCO images under their Flickr terms
    citation: "Kazemzadeh et al., ReferItGame, EMNLP 2014; Yu et al., ECCV 2016"
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xsam.data import storage
from xsam.data.schema import Task

Stage = Literal["s1", "s2", "s3"]


class SplitSpec(BaseModel):
    """Fields every split has; a reader subclasses this with the files its format reads."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["train", "eval"] = "train"
    allow_empty: bool = False  # a split with no record converts (to no shard) instead of failing


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegistryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$")
    task: Task
    format: str
    description: str = ""
    root: str = ""
    splits: dict[str, dict[str, Any]] = Field(min_length=1)
    options: dict[str, Any] = {}
    label_space: str | None = None
    stages: list[Stage] = []
    metrics: list[str] = []
    license: str = Field(min_length=1)
    citation: str = Field(min_length=1)
    homepage: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, value: Any) -> Any:
        # Removed, not just unknown: say where balancing went (reported as field "sampling_group").
        if isinstance(value, dict) and "sampling_group" in value:
            raise ValueError("sampling_group: this field was removed - S3 balances per dataset "
                             "(r_d = max(1, sqrt(t / f_d)), see docs/adding-a-dataset.md), delete the line")
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from xsam.data.readers import READERS

        if value not in READERS:
            raise ValueError(f"unknown source format {value!r}; known: {', '.join(sorted(READERS))}")
        return value

    @field_validator("splits")
    @classmethod
    def _split_names(cls, value: dict) -> dict:
        for name in value:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"invalid split name {name!r}")
        return value

    @model_validator(mode="after")
    def _known_metrics(self) -> RegistryEntry:
        if not self.metrics:
            return self
        from xsam.eval.benchmark import metric_names  # the benchmark's table is the one source of the names

        known = metric_names(self.task)
        unknown = [m for m in self.metrics if m not in known]
        if unknown:
            allowed = ", ".join(sorted(known)) if known else "none (no benchmark scores this task): use []"
            raise ValueError(f"metrics: {', '.join(map(repr, unknown))} not computed by the {self.task.value} "
                             f"benchmark, which computes: {allowed}")
        return self

    @model_validator(mode="after")
    def _reader_fields(self) -> RegistryEntry:
        reader = self.reader_class()
        errors = []
        for split, spec in self.splits.items():
            try:
                reader.Split.model_validate(spec or {})
            except ValidationError as e:
                errors += [f"splits.{split}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        try:
            reader.Options.model_validate(self.options)
        except ValidationError as e:
            errors += [f"options.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def reader_class(self):
        from xsam.data.readers import READERS

        return READERS[self.format]

    def split_spec(self, split: str) -> SplitSpec:
        return self.reader_class().Split.model_validate(self.splits[split] or {})

    def option_values(self) -> BaseModel:
        return self.reader_class().Options.model_validate(self.options)

    def source_root(self, data_root: str) -> str:
        """Where this dataset's relative paths start."""
        if storage.is_uri(self.root) or os.path.isabs(self.root):
            return self.root
        return storage.join(data_root, self.root) if self.root else data_root

    def digest(self, split: str) -> str:
        """Hash of everything in the entry that changes what a split's shards contain."""
        payload = {"name": self.name, "task": self.task.value, "format": self.format,
                   "split": self.split_spec(split).model_dump(mode="json", exclude={"allow_empty"}),
                   "options": self.option_values().model_dump(mode="json"), "label_space": self.label_space}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class RegistryProblem:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


def registry_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"registry {path} is neither a YAML file nor a folder")
    return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a registry file names the same key twice (plain YAML keeps the last silently)."""

    def __init__(self, key: str, first_line: int, second_line: int):
        super().__init__(f"duplicate key {key!r} at lines {first_line} and {second_line}")
        self.key = key


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated within one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != line:
                raise DuplicateKeyError(str(key), first, line)
        return super().construct_mapping(node, deep=deep)


def load_yaml(file: Path):
    """The YAML document of `file`; DuplicateKeyError (a yaml.YAMLError) for a key given twice."""
    return yaml.load(file.read_text(encoding="utf-8"), Loader=_StrictLoader)


def load_entry(file: Path) -> tuple[RegistryEntry | None, list[RegistryProblem]]:
    try:
        raw = load_yaml(file)
    except DuplicateKeyError as e:
        return None, [RegistryProblem(str(file), e.key, str(e))]
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return None, [RegistryProblem(str(file), "<file>", f"not valid YAML: {e}")]
    if not isinstance(raw, dict):
        return None, [RegistryProblem(str(file), "<file>", "top level must be a mapping")]
    try:
        entry = RegistryEntry.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(map(str, err["loc"])) or "<entry>"
            msg = err["msg"].removeprefix("Value error, ")
            if loc == "<entry>":
                # reader-specific problems arrive as one message: split them back into fields
                for part in msg.split("; "):
                    field, _, text = part.partition(": ")
                    problems.append(RegistryProblem(str(file), field, text))
            else:
                problems.append(RegistryProblem(str(file), loc, msg))
        return None, problems
    if entry.name != file.stem:
        return None, [RegistryProblem(str(file), "name", f"{entry.name!r} must equal the file name {file.stem!r}")]
    return entry, []


def load_registry(path: str | Path) -> tuple[dict[str, RegistryEntry], list[RegistryProblem]]:
    """Load every entry; return the valid ones by name and every problem found."""
    entries: dict[str, RegistryEntry] = {}
    problems: list[RegistryProblem] = []
    for file in registry_files(path):
        entry, errs = load_entry(file)
        problems += errs
        if entry is None:
            continue
        if entry.name in entries:
            problems.append(RegistryProblem(str(file), "name", f"duplicate dataset name {entry.name!r}"))
            continue
        entries[entry.name] = entry
    return entries, problems
