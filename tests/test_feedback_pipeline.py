"""The pipeline with an ILF feedback module: from_pretrained(..., feedback=path) and
pipe.load_feedback(path); a zero-scale module generates exactly the base's images, a trained
(non-zero) one differs, and a file for another base is a one-line error."""

import pytest
import torch

from pixsigma.errors import PixsigmaError
from pixsigma.model.feedback import FeedbackTransformer, save_feedback
from pixsigma.pipeline import SigmaPipeline
from tests.tiny_components import build_pipeline_folder

pytestmark = pytest.mark.usefixtures("single_thread")
ARGS = dict(num_inference_steps=3, output_type="pt", seed=0, guidance_scale=3.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_pipeline_folder(tmp_path_factory.mktemp("pipe") / "p")


def feedback_file(pipe, path, scale: float):
    net = FeedbackTransformer.from_transformer(pipe.transformer, 0)
    with torch.no_grad():
        net.feedback.scale.fill_(scale)
        for p in net.feedback.block.parameters():
            p.add_(0.1)
    return save_feedback(net, path)


def test_zero_scale_generates_the_base_images_and_a_trained_module_differs(folder, tmp_path):
    pipe = SigmaPipeline.from_pretrained(folder)
    ref = pipe("a red cat", **ARGS).images
    zero = feedback_file(pipe, tmp_path / "zero.safetensors", 0.0)
    pipe.load_feedback(zero)
    assert pipe.feedback is not None and torch.equal(pipe("a red cat", **ARGS).images, ref)
    calls = []
    pipe.feedback.feedback.register_forward_hook(lambda *a: calls.append(1))
    pipe("a red cat", **ARGS)
    assert len(calls) == 3  # one feedback pass per step (both guidance branches in one batch)
    trained = feedback_file(pipe, tmp_path / "half.safetensors", 0.5)
    other = SigmaPipeline.from_pretrained(folder, feedback=trained)
    assert other.feedback.feedback.scale.item() == 0.5
    assert not torch.allclose(other("a red cat", **ARGS).images, ref)
    pipe.load_feedback(None)
    assert torch.equal(pipe("a red cat", **ARGS).images, ref)


def test_feedback_errors(folder, tmp_path):
    pipe = SigmaPipeline.from_pretrained(folder)
    path = feedback_file(pipe, tmp_path / "fb.safetensors", 0.5)
    with pytest.raises(PixsigmaError, match="trained on base") as e:
        SigmaPipeline.from_pretrained(build_pipeline_folder(tmp_path / "other", seed=1), feedback=path)
    assert "\n" not in str(e.value)
    pipe.load_feedback(path)
    with pytest.raises(PixsigmaError, match="does not combine"):
        pipe("a red cat", step_cache="fora", **ARGS)
