"""Weight-only int8 / int4 layers (bitsandbytes) on tiny checkpoints: the sizes `--layers auto` and
`models plan` count are what a quantized layer stores, and quantized spans stay close to bfloat16."""

import pytest
import torch

from dsdnode.models.head import Head
from dsdnode.models.quantization import QuantizationError, layer_bytes, quantize_layers, stored_bytes
from dsdnode.models.span import Span
from dsdnode.models.weights import load_config, skeleton
from tests.helpers.tiny_models import save_tiny_family


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_quantized_spans_store_what_is_counted_and_stay_close(family, tmp_path):
    model_dir = save_tiny_family(family, tmp_path)
    head = Head.load(model_dir, torch.bfloat16)
    hidden = head.embed_tokens(list(range(3, 30)))
    ref = Span.load(model_dir, 0, 4, torch.bfloat16)
    want = head.logits(ref(hidden, ref.new_cache(32), 0))
    meta_layer = skeleton(load_config(model_dir)).model.layers[1]
    assert layer_bytes(meta_layer, "none", torch.bfloat16) == stored_bytes(ref.layers[1])
    for mode in ("int8", "int4"):
        span = Span.load(model_dir, 0, 4, torch.bfloat16)
        quantize_layers(span.layers, mode, torch.bfloat16)
        got = head.logits(span(hidden, span.new_cache(32), 0))
        assert stored_bytes(span.layers[1]) <= layer_bytes(meta_layer, mode, torch.bfloat16) < stored_bytes(ref.layers[1])
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.5, mode
    with pytest.raises(QuantizationError, match="one of none, int8, int4"):
        quantize_layers(ref.layers, "int3", torch.bfloat16)


def test_quantized_weights_have_their_own_identity_and_prequantized_checkpoints_are_refused(tmp_path):
    """A quantized server names other weights than an unquantized one, so no chain mixes them; a
    checkpoint that is already quantized (gpt-oss's MXFP4 on the Hub) is refused in one line."""
    import json

    from dsdnode.models.families import UnsupportedModel
    from dsdnode.models.weights import weights_digest, weights_identity

    model_dir = save_tiny_family("gpt_oss", tmp_path / "m")
    plain = weights_identity(model_dir)
    assert plain == weights_digest(model_dir)
    assert len({plain, weights_identity(model_dir, "int8"), weights_identity(model_dir, "int4")}) == 3
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match=r"pre-quantized weights \(mxfp4\)"):
        load_config(model_dir)
