"""LLaVA chat format: LLaVA-Pretrain (blip_laion_cc_sbu_558k) and LLaVA-1.5 mix665k.

One JSON list of records::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ..."}, {"from": "gpt", "value": "..."}]}

`image` is relative to the split's image folder and missing for text-only records, which the
schema cannot hold (a sample is an image): they are dropped and counted in
`excluded["text_only"]` (or, with `drop_text_only: false`, quarantined one by one so they show).

Mapping: one sample per image (records grouped by the normalised image path, which is the source
id), `conversations` = one `Conversation(id, turns)` per record, sorted by id (file order breaks
ties). A malformed record (a role other than human / gpt, a missing field, non-UTF-8 text, a
path escaping the image folder) quarantines its image, naming the field as `<record
index>.conversations.<turn>.value`.
"""

from __future__ import annotations

import posixpath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xsam.data.errors import SampleError, SourceError
from xsam.data.readers.base import Plan, Reader, WorkItem
from xsam.data.registry import SplitSpec
from xsam.data.schema import Conversation, Sample
from xsam.data.text import clean_text


class LlavaSplit(SplitSpec):
    annotations: str  # LLaVA chat JSON list
    images: str  # image folder


class LlavaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    drop_text_only: bool = True  # False: quarantine text-only records instead of excluding them


class _Turn(BaseModel):
    role: Literal["human", "gpt"] = Field(alias="from")
    value: str


class _Record(BaseModel):
    id: str | int
    image: str
    conversations: list[_Turn] = Field(min_length=1)


class LlavaReader(Reader):
    format = "llava"
    version = 1
    Split = LlavaSplit
    Options = LlavaOptions

    def _conversation(self, i: int, raw: dict, file: str) -> dict[str, Any]:
        record = self.validate(_Record, raw, str(i), file)
        turns = [{"role": t.role, "value": clean_text(t.value, f"{i}.conversations.{j}.value", file)}
                 for j, t in enumerate(record.conversations)]
        return {"id": clean_text(str(record.id), f"{i}.id", file), "turns": turns}

    def plan(self) -> Plan:
        file = self.path(self.spec.annotations)
        records = self.load_json(self.spec.annotations)
        if not isinstance(records, list):
            raise SourceError("LLaVA annotations must be a JSON list of records", file=file)
        plan = Plan(items=[], source_files=[file])
        text_only = 0
        chats: dict[str, list[tuple[int, dict]]] = {}  # image -> (record index, conversation)
        bad: dict[str, SampleError] = {}
        for i, raw in enumerate(records):
            if isinstance(raw, dict) and raw.get("image") is None:
                if self.options.drop_text_only:
                    text_only += 1
                else:
                    plan.quarantined.append(self.quarantine(
                        f"records[{i}]", SampleError("text-only record: a sample needs an image", field=f"{i}.image"),
                        file))
                continue
            image = raw.get("image") if isinstance(raw, dict) else None
            if not isinstance(image, str) or not image.strip():
                plan.quarantined.append(self.quarantine(
                    f"records[{i}]", SampleError("not a record with an image path", field=f"{i}.image"), file))
                continue
            source_id = posixpath.normpath(image.replace("\\", "/"))
            chats.setdefault(source_id, [])
            try:
                clean_text(image, f"{i}.image", file)
                chats[source_id].append((i, self._conversation(i, raw, file)))
            except SampleError as e:
                bad.setdefault(source_id, e)
        plan.excluded["text_only"] = text_only
        for source_id, convs in chats.items():
            try:
                if source_id in bad:
                    raise bad[source_id]
                location = self.image_file(self.spec.images, source_id, f"{convs[0][0]}.image", file)
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id, e, file))
                continue
            convs.sort(key=lambda c: (c[1]["id"], c[0]))
            payload = {"image": source_id, "conversations": [c for _, c in convs]}
            plan.items.append(self.item(source_id, [location], payload, self.spec.annotations))
        return plan

    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        image_bytes, info = self.read_image(item.files[0])
        image = self.image_info(item.payload["image"], item.payload["image"], info)
        conversations = [Conversation(**c) for c in item.payload["conversations"]]
        return image_bytes, self.sample(item, image, conversations=conversations)
