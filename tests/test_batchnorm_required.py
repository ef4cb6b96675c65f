"""Methods that adapt through BatchNorm statistics refuse a LayerNorm ViT with one error naming
the method and the model; the methods that adapt LayerNorm affines take it."""
import pytest

from metatta.methods import build_method
from metatta.models import build_model


def vit():
    return build_model("vit_tiny_fmnist", num_classes=10, in_channels=1, depth=2, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("name, config", [
    ("bn", {}),
    ("bn", {"statistics": "alpha"}),
    ("nanoadapt", {"base": "tent"}),
    ("delta", {"base": "tent"}),
])
def test_batchnorm_methods_refuse_a_model_without_batchnorm(name, config):
    with pytest.raises(ValueError, match=rf"^{name}: needs a model with BatchNorm layers; ViTClassifier has none "
                                         r"\(LayerNorm\)"):
        build_method(name, vit(), config)


@pytest.mark.parametrize("name", ["tent", "sar", "eata", "deyo"])
def test_layernorm_methods_adapt_the_vit(name):
    method = build_method(name, vit())
    assert method.adapted_parameter_count() > 0
