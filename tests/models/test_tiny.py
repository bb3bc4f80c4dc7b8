import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_fast.models.tiny import char_tokenizer, save_model, tiny_causal_lm


def test_char_tokenizer_round_trips_text():
    tok = char_tokenizer()
    text = "12+34=46\nabc"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2


def test_tiny_model_saves_and_loads(tmp_path, seed):
    tok = char_tokenizer("0123456789+=")
    for arch in ("llama", "qwen2"):
        model = tiny_causal_lm(tok, arch=arch, hidden_size=32, num_layers=1, num_heads=2)
        path = save_model(model, tok, tmp_path / arch)
        loaded = AutoModelForCausalLM.from_pretrained(path)
        tok2 = AutoTokenizer.from_pretrained(path)
        ids = torch.tensor([tok2("1+2=")["input_ids"]])
        assert torch.allclose(model(ids).logits, loaded(ids).logits)
        assert loaded.config.vocab_size == len(tok)
