"""The shared segment of ngrpo_gloo's shared-memory transport: a receiver maps only the sender's own segment (its
nonce and size), both see the same bytes, and the name is gone once the sender unlinks it."""

from __future__ import annotations

import os

import torch

from ngrpo_ray.distributed.shared_segment import SharedSegment


def test_a_receiver_maps_only_the_senders_segment_and_shares_its_bytes(tmp_path):
    sender, why = SharedSegment.create(10_000, directory=str(tmp_path))
    assert sender is not None and why == "" and sender.nbytes == 10_000
    assert torch.count_nonzero(sender.payload) == 0

    receiver = SharedSegment.attach(sender.path, 10_000, sender.nonce)
    assert receiver is not None and not receiver.owner
    sender.payload[100:104].copy_(torch.tensor([1, 2, 3, 4], dtype=torch.uint8))
    assert receiver.payload[100:104].tolist() == [1, 2, 3, 4]  # one set of pages

    assert SharedSegment.attach(sender.path, 10_000, "00" * 16) is None  # same name, not the sender's nonce
    assert SharedSegment.attach(sender.path, 9_999, sender.nonce) is None  # the size the update needs differs
    assert SharedSegment.attach("", 10_000, sender.nonce) is None  # none offered

    receiver.close()  # a receiver never removes the sender's name
    assert os.path.exists(sender.path)
    sender.unlink()
    assert not os.path.exists(sender.path)
    assert SharedSegment.attach(sender.path, 10_000, sender.nonce) is None  # another host sees no such file
    sender.close()  # and a second unlink is harmless


def test_no_segment_where_it_cannot_be_made(tmp_path):
    segment, why = SharedSegment.create(1000, directory=str(tmp_path / "absent"))
    assert segment is None and "does not exist" in why
