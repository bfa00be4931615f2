"""The features adapter: one rule for what the model sees of a stored item or an encoder's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.features import FeatureAdapter, masked_mean


def test_masked_mean_ignores_padding_and_empty_rows_give_zeros():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def test_token_mode_cuts_text_only():
    a = FeatureAdapter("tokens", max_text_tokens=2)
    x, m = torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.bool)
    assert a.from_encoder("text", x, m)[0].shape == (3, 2, 4)
    assert a.from_encoder("image", x, m)[0].shape == (3, 5, 4)
    assert a.token_limit("text") == 2 and a.token_limit("image") is None


def test_pooled_mode_is_one_real_token():
    a = FeatureAdapter("pooled")
    x, m = torch.randn(3, 5, 4), torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [False] * 5])
    tokens, mask = a.from_encoder("text", x, m)
    assert tokens.shape == (3, 1, 4) and mask.all()
    torch.testing.assert_close(tokens[:, 0], masked_mean(x, m))
    given = torch.randn(3, 4)  # an encoder's own pooled vector wins over the token mean
    torch.testing.assert_close(a.from_encoder("text", x, m, given)[0][:, 0], given)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="tokens' or 'pooled"):
        FeatureAdapter("mean")


@pytest.mark.parametrize("mode", ["tokens", "pooled"])
def test_store_and_encoder_paths_agree(pairs_csv, mode):
    """A stored item and the same item straight from its encoder reach the model as the same input."""
    from lightcrl.encoders import get_encoder

    store = cached_store("toy-text", pairs_csv, "all", EmbedOptions(num_workers=0))
    adapter = FeatureAdapter(mode, max_text_tokens=3)
    idx = np.arange(6)
    from_store = adapter.from_store(store, idx)
    enc = get_encoder("toy-text")
    out = enc.encode([store.items.texts[i] for i in idx])
    from_encoder = adapter.from_encoder("text", out.tokens, out.mask, out.pooled)
    for a, b in zip(from_store, from_encoder):
        assert a.shape == b.shape
    # fp16 storage: equal up to half-precision rounding
    np.testing.assert_allclose(from_store[0].numpy(), from_encoder[0].float().numpy(), atol=2e-3, rtol=1e-3)
    assert torch.equal(from_store[1], from_encoder[1])


def test_adapter_round_trips_through_model_json():
    a = FeatureAdapter("pooled", 16)
    assert FeatureAdapter.from_info(a.describe()) == a
    assert FeatureAdapter.from_info({}) == FeatureAdapter("tokens", None)  # runs that predate the fields
