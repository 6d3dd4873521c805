"""Garden's JSON shapes (``garden_wire``), the ProcessPayload stream decoder, the route
table and the output buffers of the Garden HTTP front end: pure logic, exact values."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from gactor.errors import ContainerNotFoundError, GardenError
from gactor.transport import garden_conn as C
from gactor.transport import garden_http as H
from gactor.transport import garden_wire as W
from gactor.transport import schema


def test_a_go_container_spec_decodes_into_gactors_names() -> None:
    go = {"handle": "h", "grace_time": 1_500_000_000, "rootfs": "/r", "image": {},
          "limits": {"bandwidth_limits": {"rate": 5, "burst": 6}, "cpu_limits": {}, "disk_limits": {},
                     "memory_limits": {"limit_in_bytes": 1 << 30}, "pid_limits": {"max": 9}},
          "netout_rules": [{"protocol": 1, "ports": [{"start": 80}], "icmps": None}],
          "netin": [{"host_port": 1, "container_port": 2}]}
    decoded = W.decode(W.CONTAINER_SPEC, go)
    assert decoded["grace_time"] == 1.5
    assert decoded["rootfs_path"] == "/r"
    assert decoded["limits"]["bandwidth"] == {"rate_in_bytes_per_second": 5, "burst_rate_in_bytes_per_second": 6}
    assert decoded["net_out"] == [{"protocol": 1, "ports": [{"start": 80}], "icmps": None}]
    spec = schema.check("create", {"spec": decoded})["spec"]
    assert (spec.limits.memory.limit_in_bytes, spec.limits.pid.max, spec.net_in[0].container_port) == (1 << 30, 9, 2)


def test_keys_match_case_insensitively_exact_first_and_unknown_ones_are_dropped() -> None:
    assert W.decode(W.CONTAINER_SPEC, {"HANDLE": "a", "Properties": {"K": "v"}, "bogus": 1}) == {
        "handle": "a", "properties": {"K": "v"}}
    assert W.decode(W.PROCESS_SPEC, {"Path": "x", "path": "y"}) == {"path": "y"}
    assert W.decode(W.PROCESS_SPEC, {"path": "y", "Path": "x"}) == {"path": "x"}  # the last wins, as in Go


def test_null_leaves_a_value_field_at_zero_and_a_pointer_at_nil() -> None:
    decoded = W.decode(W.PROCESS_SPEC, {"path": "p", "args": None, "tty": None, "limits": None,
                                        "rlimits": {"nofile": 10, "as": None}})
    assert decoded == {"path": "p", "tty": None, "override_container_limits": None,
                       "limits": {"nofile": 10, "as_": None}}
    assert schema.check("run", {"handle": "h", "spec": decoded, "stream": 0})["spec"].limits.nofile == 10


def test_durations_are_integer_nanoseconds() -> None:
    assert W.duration(10_000_000_000) == 10.0
    for bad in ("1s", -1, 1.5, True):
        with pytest.raises(GardenError, match="duration"):
            W.duration(bad)


def test_encoding_is_gos() -> None:
    assert W.encode({"a": "<b>&é", "n": None}) == '{"a":"\\u003cb\\u003e\\u0026é","n":null}\n'.encode()
    assert W.encode({}) == b"{}\n"


def test_every_shape_emits_every_go_field() -> None:
    assert list(W.container_info(None)) == ["State", "Events", "HostIP", "ContainerIP", "ContainerIPv6",
                                            "ExternalIP", "ContainerPath", "ProcessIDs", "Properties",
                                            "MappedPorts"]
    zero = W.metrics(None)
    assert zero["NetworkStat"] is None
    assert list(zero["MemoryStat"])[28] == "TotalUsageTowardLimit"
    assert len(zero["MemoryStat"]) == 32
    assert W.metrics({"age": 2.5})["Age"] == 2_500_000_000
    assert W.capacity({"memory_in_bytes": 5, "disk_in_bytes": 0}) == {"memory_in_bytes": 5}
    assert W.cpu_limits({"weight": 0, "limit_in_shares": 512}) == {"limit_in_shares": 512}
    err = W.error(ContainerNotFoundError("x"))
    assert json.dumps(err) == ('{"Type": "ContainerNotFoundError", "Message": "unknown handle: x", '
                               '"Handle": "x", "ProcessID": "", "Binary": ""}')
    bulk = W.bulk_entries({"x": {"info": None, "err": err}}, "info")
    assert bulk["x"]["Err"]["Type"] == ""
    assert bulk["x"]["Info"]["State"] == ""


def payloads(*pieces: bytes, end: bool = False) -> list[dict[str, Any]]:
    decoder = W.PayloadDecoder()
    out = []
    for piece in pieces:
        decoder.receive_data(piece)
        while (payload := decoder.next_payload()) is not None:
            out.append(payload)
    if end:
        decoder.end()
        while (payload := decoder.next_payload()) is not None:
            out.append(payload)
    return out


def test_an_empty_read_is_no_end() -> None:
    """The bytes h11 had buffered after the request are often none at all."""
    assert payloads(b"", b'{"data":"a', b'b","source":0}') == [{"data": "ab", "source": 0}]


def test_payloads_split_anywhere_even_inside_a_character() -> None:
    stream = ('{"process_id":"p","source":0,"data":"h\u00e9\u20ac"}\n{"process_id":"p","signal":1}'
              '{"process_id":"p","tty":{"window_size":{"columns":80,"rows":24}}}\n').encode()
    whole = payloads(stream)
    assert whole == [{"process_id": "p", "source": 0, "data": "h\u00e9\u20ac"}, {"process_id": "p", "signal": 1},
                     {"process_id": "p", "tty": {"window_size": {"columns": 80, "rows": 24}}}]
    for cut in range(1, len(stream)):
        assert payloads(stream[:cut], stream[cut:]) == whole, cut
    assert payloads(b'{"signal":tr', b'ue}') == [{"signal": True}]


def test_invalid_utf8_becomes_the_replacement_character_as_in_go() -> None:
    assert payloads(b'{"data":"a\xffb","source":0}\n{"signal":0}\n') == [
        {"data": "a\ufffdb", "source": 0}, {"signal": 0}]


@pytest.mark.parametrize(("data", "words"), [
    (b"nope\n", "invalid process payload"),
    (b"[1]\n", "expected a JSON object"),
    (b'{"data": "a', "invalid process payload"),  # cut off by the end of the stream
])
def test_bad_payloads_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(GardenError, match=words):
        payloads(data, end=True)


def test_an_oversized_payload_is_refused() -> None:
    decoder = W.PayloadDecoder()
    decoder.receive_data(b'{"data":"' + b"x" * (W.MAX_PAYLOAD + 1))
    with pytest.raises(GardenError, match="larger than"):
        decoder.next_payload()


def test_routes_prefer_literal_segments_and_know_their_methods() -> None:
    assert [(m, n) for m, n, _ in H.match(["containers", "bulk_info"])] == [("GET", "bulk_info"), ("DELETE", "destroy")]
    [(method, name, params)] = H.match(["containers", "h%2F", "processes", "p"])
    assert (method, name, params) == ("GET", "attach", {"handle": "h%2F", "pid": "p"})
    out = H.match(["containers", "h", "processes", "p", "attaches", "7", "stderr"])
    assert out == [("GET", "stderr", {"handle": "h", "pid": "p", "streamid": "7"})]
    assert H.match(["nope"]) == []


async def test_a_full_buffer_waits_for_its_reader_and_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    buffer = H.OutputBuffer(attach_deadline=trio.current_time() + H.ATTACH_WINDOW)
    buffer.attach()
    chunk = b"x" * (H.OUTPUT_BUFFER // 4)
    got = bytearray()
    async with trio.open_nursery() as nursery:
        async def producer() -> None:
            for _ in range(40):
                await buffer.put(chunk)
            buffer.end()

        nursery.start_soon(producer)
        await trio.sleep(100)  # far past the attach window: a reader is there, so it waits
        assert buffer.size == H.OUTPUT_BUFFER
        while (data := await buffer.take()) is not None:
            got += data
    assert len(got) == 40 * len(chunk)


async def test_output_nobody_opened_is_kept_for_the_window_then_dropped(autojump_clock: trio.abc.Clock) -> None:
    buffer = H.OutputBuffer(attach_deadline=trio.current_time() + H.ATTACH_WINDOW)
    chunk = b"y" * H.OUTPUT_BUFFER
    await buffer.put(chunk)  # fits
    start = trio.current_time()
    await buffer.put(chunk)  # full: waits for a reader until the window closes, then drops
    assert trio.current_time() - start == pytest.approx(H.ATTACH_WINDOW)
    assert buffer.size == H.OUTPUT_BUFFER
    await buffer.put(chunk)  # past the window: dropped at once
    assert trio.current_time() - start == pytest.approx(H.ATTACH_WINDOW)
    buffer.attach()  # a late reader still gets what was kept
    assert await buffer.take() == chunk


def test_debug_vars_never_show_the_token() -> None:
    assert C.redacted(["gactor", "--token", "s3cret", "--listen", "x", "--token=s3cret"]) == [
        "gactor", "--token", "<redacted>", "--listen", "x", "--token=<redacted>"]
    assert C.debug_vars()["memstats"]["Alloc"] > 0
