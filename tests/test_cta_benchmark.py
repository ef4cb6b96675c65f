"""benchmarks/cta.py's result tag and the encoder-by-BN-statistics table it reports (metatta.ssl.diagnostics);
the benchmark itself is not run."""
import numpy as np
import pytest
import torch

from metatta.data.types import DomainData
from metatta.models import build_model
from metatta.models.checkpoint import read_header, save_checkpoint
from metatta.ssl import build_network
from metatta.ssl.diagnostics import encoder_modes
from metatta.ssl.networks import save_network, source_model_info
from repo_scripts import load_script

WIDTHS = [4, 8, 8]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/cta.py")


def test_the_tag_names_the_result_files(bench):
    assert bench.parse_args([]).tag == "cta"
    assert bench.parse_args(["--tag", "cta_e64", "--num-images", "100"]).tag == "cta_e64"


def _adapter(tmp_path, source, checkpoint, encoder_state=None):
    net = build_network(source, {"projector": [8, 4]})
    if encoder_state is not None:
        net.encoder.load_state_dict(encoder_state)
    return save_network(net, tmp_path / "adapter", "cta", source_model_info(read_header(checkpoint)),
                        extra={"source_checkpoint": str(checkpoint)})


def test_encoder_modes_read_both_encoders_with_both_statistics(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet_fmnist", 10, 1, widths=WIDTHS)
    checkpoint = save_checkpoint(tmp_path / "src.pt", source, model_name="resnet_fmnist", model_kwargs={"widths": WIDTHS},
                                 num_classes=10, in_channels=1, dataset="fashion_mnist")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 24, 28, 28, 1), dtype=np.uint8)
    torch.manual_seed(1)
    ssl = build_network(source, {})  # another SSL encoder before the source classifier
    ssl.encoder.load_state_dict(build_network(build_model("resnet_fmnist", 10, 1, widths=WIDTHS), {}).encoder.state_dict())
    for name, buffer in ssl.encoder.named_buffers():
        if name.endswith("running_mean"):
            buffer.add_(3.0)  # source statistics far from these images': the two modes differ
    with torch.no_grad():  # labels = what that network predicts with its own running statistics
        labels = [ssl.eval()(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy() for x in images]
    domains = [DomainData(name, 5, x, y) for name, x, y in zip(("fog", "snow"), images, labels)]
    # an SSL encoder that is the supervised one: the two rows agree in each mode
    same = encoder_modes(_adapter(tmp_path / "a", source, checkpoint), domains)
    assert set(same) == {"ssl_batch", "ssl_source", "sup_batch", "sup_source"}
    assert same["ssl_batch"] == same["sup_batch"] and same["ssl_source"] == same["sup_source"]
    # the other encoder changes the SSL row only; each number is the error of that network in that mode
    moved = encoder_modes(_adapter(tmp_path / "b", source, checkpoint, ssl.encoder.state_dict()), domains)
    assert moved["sup_batch"] == same["sup_batch"] and moved["sup_source"] == same["sup_source"]
    assert moved["ssl_source"] == 0
    for key, network in (("ssl", ssl), ("sup", source)):
        for statistics in ("batch", "source"):
            assert moved[f"{key}_{statistics}"] == pytest.approx(_error(network, domains, statistics))


def _error(network, domains, statistics):
    import copy

    from metatta.methods.common import use_batch_statistics

    network = copy.deepcopy(network).eval()
    if statistics == "batch":
        use_batch_statistics(network)
    with torch.no_grad():
        return float(np.mean([100 * (network(torch.from_numpy(d.images).permute(0, 3, 1, 2).float() / 255).argmax(1)
                                     != torch.from_numpy(np.asarray(d.labels))).float().mean() for d in domains]))
