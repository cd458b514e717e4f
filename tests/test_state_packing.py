"""Lossless packing of training states: the same bits back, shared storage once, smaller files, corrupt data named."""

import struct

import numpy as np
import pytest
import torch

from qkrank import checkpoint, state_packing


def bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.int32).numpy()


def test_round_trip_keeps_every_bit_including_nan_payloads_zeros_and_denormals():
    special = [struct.unpack("<f", struct.pack("<I", u))[0] for u in
               (0x7FC00001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x807FFFFF)]
    rng = np.random.default_rng(0)
    random_bits = torch.from_numpy(rng.integers(0, 2**32, size=70_000, dtype=np.uint32).view(np.float32))
    state = {"weights": torch.randn(300, 200) * 0.02,
             "special": torch.tensor(special * 1000, dtype=torch.float32),
             "random_bits": random_bits,  # incompressible high bytes still come back
             "transposed": (torch.randn(128, 64)).t(),
             "nested": [{"m": torch.randn(5000)}, (torch.randn(4097), 3)],
             "small": torch.randn(10), "ints": torch.arange(10_000), "half": torch.randn(5000).half(),
             "scalar": 1.5, "name": "cell"}
    packed = state_packing.pack(state)
    assert state_packing.MARKER in packed["weights"] and state_packing.MARKER in packed["transposed"]
    assert packed["small"] is state["small"] and packed["ints"] is state["ints"] and packed["half"] is state["half"]
    back = state_packing.unpack(packed)
    for key in ("weights", "special", "random_bits", "transposed"):
        assert back[key].shape == state[key].shape and back[key].dtype == torch.float32
        assert np.array_equal(bits(back[key]), bits(state[key])), key
    assert np.array_equal(bits(back["nested"][0]["m"]), bits(state["nested"][0]["m"]))
    assert isinstance(back["nested"][1], tuple) and back["nested"][1][1] == 3
    assert np.array_equal(bits(back["nested"][1][0]), bits(state["nested"][1][0]))
    assert back["scalar"] == 1.5 and back["name"] == "cell"


def test_a_saved_packed_state_loads_safely_is_smaller_and_shares_tied_storage(tmp_path):
    embed = torch.randn(4096, 128) * 0.02
    state = {"model": {"embed.weight": embed, "lm_head.weight": embed, "w": torch.randn(512, 512) * 0.02},
             "optimizers": {"muon": {"state": {0: {"momentum_buffer": torch.randn(512, 512) * 1e-3}}}}}
    torch.save(state, tmp_path / "plain.pt")
    checkpoint.save_state(state, tmp_path / "packed.pt")
    ratio = (tmp_path / "packed.pt").stat().st_size / (tmp_path / "plain.pt").stat().st_size
    assert ratio < 0.85  # the high byte of Gaussian weights holds about 3 of its 8 bits
    loaded = checkpoint.safe_load(tmp_path / "packed.pt")  # weights_only=True reads it
    back = state_packing.unpack(loaded)
    assert back["model"]["embed.weight"] is back["model"]["lm_head.weight"]
    for name, value in state["model"].items():
        assert torch.equal(back["model"][name], value)
    assert torch.equal(back["optimizers"]["muon"]["state"][0]["momentum_buffer"],
                       state["optimizers"]["muon"]["state"][0]["momentum_buffer"])


def test_unpacking_a_plain_snapshot_changes_nothing():
    plain = {"model": {"w": torch.randn(100, 100)}, "tokens_seen": 3}
    back = state_packing.unpack(plain)
    assert back["model"]["w"] is plain["model"]["w"] and back["tokens_seen"] == 3


def test_corrupt_or_short_high_bytes_are_named(tmp_path):
    state = {"config_hash": "abc", "model": {"w": torch.randn(300, 300)}}
    packed = state_packing.pack(state)
    chunk = packed["model"]["w"]["high"][0]
    packed["model"]["w"]["high"][0] = chunk[: len(chunk) // 2].clone()
    torch.save(packed, tmp_path / "1.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"1\.pt: packed tensor: corrupt high bytes"):
        checkpoint.load_state(tmp_path / "1.pt", "abc")
    packed = state_packing.pack(state)
    packed["model"]["w"]["low"] = packed["model"]["w"]["low"][:-7].clone()
    with pytest.raises(state_packing.PackingError, match="do not fit shape"):
        state_packing.unpack(packed)
    packed = state_packing.pack(state)
    packed["model"]["w"][state_packing.MARKER] = 99
    with pytest.raises(state_packing.PackingError, match="format 99"):
        state_packing.unpack(packed)
    packed = state_packing.pack(state)
    packed["model"]["w"]["high"] = packed["model"]["w"]["high"] * 2
    with pytest.raises(state_packing.PackingError, match="180000 high bytes for 90000 values"):
        state_packing.unpack(packed)
    for key, value, message in (("shape", [299, 300], "do not fit shape"), ("shape", "x", "malformed"),
                                ("low", None, "do not fit shape")):
        packed = state_packing.pack(state)
        packed["model"]["w"][key] = value
        with pytest.raises(state_packing.PackingError, match=message):
            state_packing.unpack(packed)
    packed = state_packing.pack(state)
    del packed["model"]["w"]["high"]
    torch.save(packed, tmp_path / "2.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"2\.pt: packed tensor: malformed \(KeyError"):
        checkpoint.load_state(tmp_path / "2.pt", "abc")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_flipped_byte_in_the_pickle_is_a_checkpoint_error_naming_the_file(tmp_path):
    import zipfile

    path = tmp_path / "3.pt"
    checkpoint.save_state({"config_hash": "abc", "model": {"w": torch.randn(100, 100)}}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        (info,) = [i for i in z.infolist() if i.filename.endswith("data.pkl")]
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    failures = set()
    for offset in range(info.compress_size):  # every byte of the pickle, one at a time
        flipped = bytearray(raw)
        flipped[start + offset] ^= 0x01
        path.write_bytes(flipped)
        try:
            checkpoint.load_state(path, "abc")
        except checkpoint.CheckpointError as e:
            assert str(path) in str(e)
            failures.add(type(e).__name__)
    assert failures  # some flips are caught; none escapes as another exception type
