import pytest
import torch

from kdlab.worker import kd
from kdlab.worker.kd.losses import LogitsKL

transformers = pytest.importorskip("transformers")


def tiny_gpt2(n_layer: int) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def test_model_output_logits_reach_the_loss():
    torch.manual_seed(0)
    student, teacher = tiny_gpt2(1), tiny_gpt2(2)
    tokens = torch.randint(0, 32, (2, 8))
    s_logits = student(tokens).logits
    t_logits = teacher(tokens).logits
    dm = kd.convert(student, teacher=teacher, criterion=LogitsKL(temperature=2.0))
    dm(tokens)
    loss = dm.compute_kd_loss()
    p_t = torch.softmax(t_logits / 2, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s_logits / 2, -1))).sum(-1)
    torch.testing.assert_close(loss, 4 * kl.mean())  # token-level batchmean over 2×8 positions


def test_hidden_state_pairs_on_a_transformer():
    torch.manual_seed(0)
    student, teacher = tiny_gpt2(1), tiny_gpt2(2)
    tokens = torch.randint(0, 32, (2, 8))
    from kdlab.worker.kd.losses import FeatureMSE

    dm = kd.convert(
        student,
        teacher=teacher,
        criterion={("transformer.ln_f", "transformer.ln_f"): FeatureMSE(adapter=None)},
        example_input=tokens,
    )
    dm(tokens)
    assert dm.compute_kd_loss().item() > 0
    student = kd.export(dm)
    assert type(student) is transformers.GPT2LMHeadModel
