"""The AMI codec against the bytes of a real Asterisk 22 session, and its failure modes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.ami.codec import Message, MessageReader, encode
from balancer.errors import AmiProtocolError

# A real Asterisk 22.10.1 session (a copy of shared/ami/asterisk22-originate-session.txt).
RECORDING = Path(__file__).parent / "data" / "asterisk22-originate-session.txt"


def _received_bytes() -> bytes:
    """The ``<<`` side of the recording as Asterisk sent it: CRLF lines, a blank line ends each."""
    lines = [line[3:] for line in RECORDING.read_text().split("\n") if line.startswith("<<")]
    return ("\r\n".join(lines) + "\r\n").encode()


RECEIVED = _received_bytes()


def _parse_whole(data: bytes = RECEIVED) -> list[Message]:
    return MessageReader().feed(data)


def _parse_in_chunks(data: bytes, sizes: list[int]) -> list[Message]:
    reader = MessageReader()
    out: list[Message] = []
    pos, i = 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        out += reader.feed(data[pos : pos + size])
        pos += size
        i += 1
    assert reader.buffered == 0
    return out


WHOLE = _parse_whole()


def _events(name: str) -> list[Message]:
    return [m for m in WHOLE if m.get("Event") == name]


def test_recording_parses_in_one_chunk() -> None:
    reader = MessageReader()
    messages = reader.feed(RECEIVED)
    assert reader.banner == "Asterisk Call Manager/11.0.0"
    assert reader.version == "11.0.0"
    assert reader.buffered == 0
    # every blank `<<` line ends one message; the banner is not a message
    blank_lines = sum(1 for line in RECORDING.read_text().split("\n") if line.rstrip() == "<<")
    assert len(messages) == blank_lines
    assert all("Event" in m or "Response" in m for m in messages)


def test_recording_byte_by_byte_gives_the_same_messages() -> None:
    reader = MessageReader()
    out: list[Message] = []
    for i in range(len(RECEIVED)):
        out += reader.feed(RECEIVED[i : i + 1])
    assert out == WHOLE


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40))
def test_recording_in_random_chunks_gives_the_same_messages(sizes: list[int]) -> None:
    assert _parse_in_chunks(RECEIVED, sizes) == WHOLE


def test_recording_event_counts() -> None:
    assert len(_events("Newchannel")) == 6
    assert len(_events("Hangup")) == 6
    assert len(_events("OriginateResponse")) == 3
    assert len(_events("CoreShowChannel")) == 4
    assert len(_events("FullyBooted")) == 1


def test_recording_field_values() -> None:
    login = WHOLE[0]
    assert login == {
        "Response": "Success",
        "ActionID": "smoke-1",
        "Message": "Authentication accepted",
    }
    first = _events("Newchannel")[0]
    assert first["Channel"] == "Local/5551234@default-00000000;1"
    assert first["CallerIDNum"] == "<unknown>"
    assert first["AccountCode"] == ""  # `AccountCode: ` has an empty value
    assert first["Privilege"] == "call,all"
    assert list(first)[:3] == ["Event", "Privilege", "Channel"]  # order and case kept
    hangup = _events("Hangup")[0]
    assert (hangup["Cause"], hangup["Cause-txt"]) == ("16", "Normal Clearing")
    congestion = [h for h in _events("Hangup") if h["Cause"] == "34"]
    assert {h["Cause-txt"] for h in congestion} == {"Circuit/channel congestion"}
    dial_end = [d for d in _events("DialEnd") if d["DialStatus"] == "CONGESTION"]
    assert len(dial_end) == 1 and "Channel" not in dial_end[0]


def test_recording_failed_originate_response() -> None:
    failed = [m for m in _events("OriginateResponse") if m["Response"] == "Failure"]
    assert len(failed) == 1
    assert failed[0] == {
        "Event": "OriginateResponse",
        "Privilege": "call,all",
        "ActionID": "smoke-5",
        "Response": "Failure",
        "Channel": "Local/7123@default",
        "Context": "default",
        "Exten": "8365",
        "Reason": "0",
        "Uniqueid": "<unknown>",
        "CallerIDNum": "7123",
        "CallerIDName": "smoke",
    }
    ok = [m for m in _events("OriginateResponse") if m["Response"] == "Success"]
    assert [m["Reason"] for m in ok] == ["4", "4"]


def test_recording_command_output_lines_are_joined() -> None:
    by_id = {m.get("ActionID"): m for m in WHOLE if "Response" in m and "Event" not in m}
    assert by_id["smoke-11"]["Output"] == "0 active channels\n0 active calls\n5 calls processed"
    assert by_id["smoke-10"]["Output"].startswith("Asterisk 22.10.1 built by")
    assert by_id["smoke-12"]["Ping"] == "Pong"
    assert by_id["smoke-13"]["Response"] == "Goodbye"


def test_recording_event_list() -> None:
    start = [m for m in WHOLE if m.get("EventList") == "start"]
    assert [m["ActionID"] for m in start] == ["smoke-3", "smoke-4", "smoke-7"]
    assert all(m["Message"] == "Channels will follow" for m in start)
    complete = _events("CoreShowChannelsComplete")
    assert [(m["ActionID"], m["ListItems"]) for m in complete] == [
        ("smoke-3", "2"),
        ("smoke-4", "0"),
        ("smoke-7", "2"),
    ]
    items = [m for m in _events("CoreShowChannel") if m["ActionID"] == "smoke-3"]
    assert {m["Uniqueid"] for m in items} == {"1795355049.0", "1795355049.1"}


def test_repeated_keys_are_joined() -> None:
    reader = MessageReader(expect_banner=False, required_keys=("Action",))
    msgs = reader.feed(b"Action: Originate\r\nVariable: A=1\r\nVariable: B=2\r\n\r\n")
    assert msgs == [{"Action": "Originate", "Variable": "A=1\nB=2"}]


def test_key_without_value_and_lines_without_separator() -> None:
    reader = MessageReader(expect_banner=False)
    msgs = reader.feed(b"Event: X\r\nEmpty:\r\njust text\r\nKey:NoSpace\r\nA: b: c\r\n\r\n")
    assert msgs == [{"Event": "X", "Empty": "", "A": "b: c"}]


LEGACY = (
    b"Response: Follows\r\nPrivilege: Command\r\nActionID: c-1\r\n"
    b"2 active channels\n1 active call\n\nChannel: odd line\n7 calls processed\n"
    b"--END COMMAND--\r\n\r\n"
    b"Event: FullyBooted\r\nPrivilege: system,all\r\n\r\n"
)


def test_legacy_command_follows() -> None:
    msgs = MessageReader(expect_banner=False).feed(LEGACY)
    assert msgs[0] == {
        "Response": "Follows",
        "Privilege": "Command",
        "ActionID": "c-1",
        "Output": "2 active channels\n1 active call\n\nChannel: odd line\n7 calls processed",
    }
    assert msgs[1]["Event"] == "FullyBooted"


def test_legacy_command_follows_byte_by_byte() -> None:
    reader = MessageReader(expect_banner=False)
    out: list[Message] = []
    for i in range(len(LEGACY)):
        out += reader.feed(LEGACY[i : i + 1])
    assert out == MessageReader(expect_banner=False).feed(LEGACY)


def test_legacy_output_without_final_newline() -> None:
    data = b"Response: Follows\r\nPrivilege: Command\r\nNo such command 'x'--END COMMAND--\r\n\r\n"
    msgs = MessageReader(expect_banner=False).feed(data)
    assert msgs == [
        {"Response": "Follows", "Privilege": "Command", "Output": "No such command 'x'"}
    ]


def test_multibyte_character_split_across_feeds_survives() -> None:
    data = "Event: Newchannel\r\nCallerIDName: José Müller 日本\r\n\r\n".encode()
    split = data.index("日".encode()) + 1  # in the middle of a 3-byte character
    reader = MessageReader(expect_banner=False)
    assert reader.feed(data[:split]) == []
    msgs = reader.feed(data[split:])
    assert msgs[0]["CallerIDName"] == "José Müller 日本"


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    reader = MessageReader(expect_banner=False)
    msgs = reader.feed(
        b"Event: Newchannel\r\nCallerIDName: caf\xc3 \xff\xfe\r\n\r\nEvent: Next\r\n\r\n"
    )
    assert msgs[0]["CallerIDName"] == "caf\ufffd \ufffd\ufffd"
    assert msgs[1] == {"Event": "Next"}


def test_one_megabyte_line_raises_and_reader_stays_failed() -> None:
    reader = MessageReader(expect_banner=False)
    with pytest.raises(AmiProtocolError, match="over 65536 bytes without terminator"):
        for _ in range(16):
            reader.feed(b"x" * 65536)
    with pytest.raises(AmiProtocolError, match="unusable"):
        reader.feed(b"Event: X\r\n\r\n")


def test_oversized_message_raises_however_it_is_split() -> None:
    data = b"Event: Big\r\nData: " + b"y" * 70_000 + b"\r\n\r\n"
    with pytest.raises(AmiProtocolError):
        MessageReader(expect_banner=False).feed(data)
    reader = MessageReader(expect_banner=False)
    with pytest.raises(AmiProtocolError):
        for i in range(0, len(data), 1000):
            reader.feed(data[i : i + 1000])
    # a message exactly at the limit is fine in one chunk and byte by byte alike
    limit = 200
    exact = b"Event: E\r\nD: " + b"z" * (limit - 13) + b"\r\n\r\n"
    assert len(exact) - 4 == limit
    assert MessageReader(expect_banner=False, max_message_bytes=limit).feed(exact)
    reader = MessageReader(expect_banner=False, max_message_bytes=limit)
    assert any([reader.feed(exact[i : i + 1]) for i in range(len(exact))])


def test_garbage_block_raises() -> None:
    reader = MessageReader(expect_banner=False)
    with pytest.raises(AmiProtocolError, match="not an AMI message: no Event/Response key"):
        reader.feed(b"\x16\x03\x01 this is not AMI\r\n<html>nope</html>\r\n\r\n")


def test_bad_banner_raises() -> None:
    with pytest.raises(AmiProtocolError, match="banner"):
        MessageReader().feed(b"SSH-2.0-OpenSSH_9.2\r\n")


def test_stray_blank_lines_between_messages_are_skipped() -> None:
    msgs = MessageReader(expect_banner=False).feed(b"Event: A\r\n\r\n\r\n\r\nEvent: B\r\n\r\n")
    assert msgs == [{"Event": "A"}, {"Event": "B"}]


def test_encode_round_trip() -> None:
    headers = {
        "Action": "Originate",
        "ActionID": "x-1",
        "Variable": ["A=1", "B=2"],
        "Async": "true",
    }
    data = encode(headers)
    assert data == (
        b"Action: Originate\r\nActionID: x-1\r\nVariable: A=1\r\nVariable: B=2\r\n"
        b"Async: true\r\n\r\n"
    )
    reader = MessageReader(expect_banner=False, required_keys=("Action",))
    assert reader.feed(data) == [
        {"Action": "Originate", "ActionID": "x-1", "Variable": "A=1\nB=2", "Async": "true"}
    ]
    assert (
        encode([("Action", "Ping"), ("ActionID", "é")])
        == "Action: Ping\r\nActionID: é\r\n\r\n".encode()
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"Action": "Ping\r\nAction: Logoff"},
        {"Action": "Ping\nX: y"},
        {"Action\r\nX": "Ping"},
        {"Variable": ["A=1", "B=2\r\n\r\nAction: Logoff"]},
        {"": "x"},
        {"Key: x": "y"},
    ],
)
def test_encode_rejects_header_injection(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        encode(headers)
