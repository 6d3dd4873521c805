"""Process ids the server makes for a run without one: version 4 UUIDs as text."""

from __future__ import annotations

import uuid

from gactor.transport.methods import new_process_id


def test_a_new_process_id_is_a_random_uuid4_in_its_text_form() -> None:
    ids = [new_process_id() for _ in range(2000)]
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    assert len(set(ids)) == len(ids)
