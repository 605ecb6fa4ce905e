"""The Hugging Face export and import (nanochat/hf.py): transformers loads an exported directory with no custom code
and computes our logits, its tokenizer and chat template give our ids, the same greedy reply comes out of
transformers' generate and chat_cli, a directory reads back into the same GPT and Tokenizer, and what either side
cannot express is refused with a message that names it."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat.checkpoint import model_meta, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf import export_hf, load_hf_directory, read_safetensors, write_safetensors
from nanochat.loading import ExportError
from nanochat.training import boundary_errors_exit
from scripts import chat_cli
from scripts import export as export_script
from tests.conftest import randomized

pytestmark = pytest.mark.usefixtures("one_thread")


def random_gpt(vocab_size: int, config_class=GPTConfig, **overrides) -> GPT:
    """A depth-2 GPT with every weight random (no zero-init identity blocks), grouped-query attention and a
    non-default rotary base, so the logits depend on every part of the architecture being mapped right."""
    torch.manual_seed(0)
    config = config_class(**{"sequence_len": 128, "vocab_size": vocab_size, "n_layer": 2, "n_head": 4,
                             "n_kv_head": 2, "n_embd": 64, "rope_base": 5000.0, **overrides})
    return randomized(GPT(config), head_std=0.5).eval()


@pytest.fixture(scope="module")
def gpt(tiny_tokenizer) -> GPT:
    return random_gpt(tiny_tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gpt, tiny_tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    export_hf(gpt, tiny_tokenizer, {"step": 7}, directory)
    return directory


@pytest.fixture(scope="module")
def hf_model(exported):
    return AutoModelForCausalLM.from_pretrained(exported).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return AutoTokenizer.from_pretrained(exported)


# -----------------------------------------------------------------------------
# The model


def test_the_config_describes_our_model(exported, gpt, tiny_tokenizer):
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
    config = json.loads((exported / "config.json").read_text())
    special = tiny_tokenizer.special_tokens
    assert config["model_type"] == "nanochat"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (64, 2, 4, 2, 256)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 5000.0}
    assert config["final_logit_softcapping"] == GPT.SOFTCAP
    assert config["vocab_size"] == gpt.config.vocab_size and config["max_position_embeddings"] == 128
    assert (config["bos_token_id"], config["eos_token_id"]) == (special["<|bos|>"], special["<|assistant_end|>"])
    assert config["dtype"] == "float32"
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [special["<|assistant_end|>"], special["<|bos|>"]]


def test_transformers_computes_our_logits_in_fp32(hf_model, gpt, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog, twice: 1234!",
                                              prepend="<|bos|>")])
    with torch.no_grad():
        ours, theirs = gpt(ids), hf_model(ids).logits
    assert hf_model.dtype == torch.float32 and ids.size(1) > 20
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_our_safetensors_files_are_what_the_reference_library_reads_and_writes(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2, 2).half()}
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    for name, tensor in safetensors.torch.load_file(tmp_path / "ours.safetensors").items():
        assert torch.equal(tensor, tensors[name]) and tensor.dtype == tensors[name].dtype
    safetensors.torch.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    read, metadata = read_safetensors(tmp_path / "theirs.safetensors")
    assert metadata == {"format": "pt"} and read.keys() == tensors.keys()
    assert all(torch.equal(read[name], tensors[name]) for name in tensors)


# -----------------------------------------------------------------------------
# The tokenizer and the chat template

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a   joke.\n\nA short one."}],
    [{"role": "system", "content": "Use the tool."}, {"role": "user", "content": "What is 12*34?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute it."},
                                       {"type": "python", "text": "print(12*34)"},
                                       {"type": "python_output", "text": "408\n"},
                                       {"type": "text", "text": " It's 408."}]},
     {"role": "user", "content": "And 408/2?"}],
    [{"role": "user", "content": "naïve café 日本語 😀"}, {"role": "assistant", "content": "a final reply"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_chat_template_renders_our_prompt_ids(hf_tokenizer, tiny_tokenizer, messages):
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert theirs == tiny_tokenizer.render_for_completion({"messages": messages})


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_without_a_generation_prompt_the_template_renders_the_training_ids(hf_tokenizer, tiny_tokenizer, messages):
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert theirs == tiny_tokenizer.render_conversation({"messages": messages})[0]


def test_special_token_names_inside_messages_stay_text_when_sanitized(hf_tokenizer, tiny_tokenizer):
    messages = [{"role": "user", "content": "what does <|user_end|> mean?"}]
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, sanitize_control_tokens=True)
    assert theirs["input_ids"] == tiny_tokenizer.render_for_completion({"messages": messages})


def test_the_chat_template_refuses_what_our_rendering_refuses(hf_tokenizer):
    for messages in ([{"role": "assistant", "content": "first"}], [{"role": "system", "content": "alone"}],
                     [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]):
        with pytest.raises(TemplateError):
            hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)


TRICKY_TEXTS = [
    "", " ", "hello world", "Hello, World! 123456789 0.5 1,000,000", "I'm sure we'll see they've SHE'D YOU'RE",
    "a  b   c    d", "tabs\t\tand\nnew\n\nlines\r\n\r\n", "   leading and trailing   ", "naïve café résumé",
    "日本語のテキスト", "emoji 😀👍🏽 family 👨‍👩‍👧", "\u00a0no-break\u3000ideographic\u2028line separator",
    "١٢٣ ٤٥٦ Arabic digits", "ẞ ǅ ﬁ ligatures", "x" * 300, "'''\"\"\"```", "def f(x):\n    return x**2\n",
]


def test_autotokenizer_encodes_and_decodes_like_ours(hf_tokenizer, tiny_tokenizer, mirror_texts):
    for text in TRICKY_TEXTS + [text[:2000] for text in mirror_texts[300:340]]:
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert ids == tiny_tokenizer.encode(text), text
        assert hf_tokenizer.decode(ids) == text


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_autotokenizer_encodes_any_text_like_ours(hf_tokenizer, tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
    assert hf_tokenizer.decode(ids) == text


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_autotokenizer_decodes_any_ids_like_ours(hf_tokenizer, tiny_tokenizer, data):
    """Byte tokens that split a character decode to the same replacement characters on both sides."""
    ids = data.draw(st.lists(st.integers(0, tiny_tokenizer.get_vocab_size() - 1), max_size=12))
    assert hf_tokenizer.decode(ids) == tiny_tokenizer.decode(ids)


# -----------------------------------------------------------------------------
# Import: a directory back into our GPT and Tokenizer


def test_an_exported_directory_imports_as_the_same_model_and_tokenizer(exported, gpt, tiny_tokenizer):
    model, tokenizer, meta = load_hf_directory(exported, torch.device("cpu"))
    assert meta["step"] == 7 and meta["model_config"] == dataclasses.asdict(gpt.config)
    assert tokenizer.fingerprint() == tiny_tokenizer.fingerprint() == meta["tokenizer_fingerprint"]
    assert tokenizer.encode(TRICKY_TEXTS[4]) == tiny_tokenizer.encode(TRICKY_TEXTS[4])
    ours = gpt.state_dict()
    assert all(torch.equal(tensor, ours[name]) for name, tensor in model.state_dict().items())
    ids = torch.tensor([tiny_tokenizer.encode("round trip", prepend="<|bos|>")])
    with torch.no_grad():
        assert torch.equal(model(ids), gpt(ids))


# -----------------------------------------------------------------------------
# The bar: a tiny chat model gives the same greedy reply through transformers and through chat_cli

PROMPT = "Hello there"
MAX_TOKENS = 16


@pytest.fixture
def stopping_chat_model(tiny_gpt, tiny_tokenizer):
    """tiny_gpt (whose special tokens never win) made to end its reply: <|assistant_end|> gets the LM head row of a
    token its greedy reply writes a few tokens in, scaled up so it wins wherever that token would."""
    prompt = tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": PROMPT}]})
    reply = list(tiny_gpt.generate(prompt, MAX_TOKENS, temperature=0.0))
    stop_at = next(i for i in range(3, MAX_TOKENS) if reply[i] not in reply[:i])
    model = copy.deepcopy(tiny_gpt)
    with torch.no_grad():
        model.lm_head.weight[tiny_tokenizer.encode_special("<|assistant_end|>")] = 1.2 * model.lm_head.weight[
            reply[stop_at]]
    return model


def test_transformers_and_chat_cli_give_the_same_greedy_reply(stopping_chat_model, tiny_tokenizer, base_dir,
                                                               tmp_path, capsys):
    tiny_tokenizer.save(base_dir / "tokenizer")
    save_checkpoint(base_dir / "chatsft_checkpoints" / "d2", 5, stopping_chat_model.state_dict(), None,
                    model_meta(stopping_chat_model.config, tiny_tokenizer, 5))
    out = tmp_path / "hf"
    export_script.main(["--format", "hf", "--source", "sft", "--out", str(out)])

    hf_model, hf_tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    inputs = hf_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                              return_tensors="pt")
    generated = hf_model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, inputs["input_ids"].size(1):]
    assert 0 < len(generated) < MAX_TOKENS and generated[-1] == tiny_tokenizer.encode_special("<|assistant_end|>")
    hf_reply = hf_tokenizer.decode(generated[:-1])
    assert hf_reply.strip()

    common = ["-p", PROMPT, "--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--device-type", "cpu"]
    capsys.readouterr()
    assert chat_cli.main(common) == 0
    assert capsys.readouterr().out == hf_reply + "\n"
    assert chat_cli.main(["--hf", str(out), *common]) == 0
    assert capsys.readouterr().out == hf_reply + "\n"


# -----------------------------------------------------------------------------
# Refusals: what one side cannot express, and broken directories


@dataclasses.dataclass
class WindowedConfig(GPTConfig):
    sliding_window: int = 0  # a feature transformers' NanoChat has no setting for


def test_export_refuses_a_config_field_nanochat_cannot_express(tiny_tokenizer, tmp_path):
    model = random_gpt(tiny_tokenizer.get_vocab_size(), WindowedConfig, sliding_window=64)
    with pytest.raises(ExportError, match="sliding_window=64"):
        export_hf(model, tiny_tokenizer, {}, tmp_path)
    assert not list(tmp_path.iterdir())


def test_export_refuses_weights_nanochat_has_no_place_for(gpt, tiny_tokenizer, tmp_path):
    model = copy.deepcopy(gpt)
    model.transformer.h[0].attn.lora_a = torch.nn.Parameter(torch.zeros(8, 64))
    with pytest.raises(ExportError, match=r"transformer\.h\.0\.attn\.lora_a.*merge"):
        export_hf(model, tiny_tokenizer, {}, tmp_path)


def edited_copy(exported: Path, tmp_path: Path, edit_config=None) -> Path:
    directory = tmp_path / "edited"
    directory.mkdir()
    for path in exported.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    if edit_config is not None:
        config = json.loads((directory / "config.json").read_text())
        edit_config(config)
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(model_type="llama"), "'llama' model; nanochat loads only model_type 'nanochat'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings=True"),
    (lambda c: c.update(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    (lambda c: c["rope_parameters"].update(rope_type="yarn"), "rope type='yarn'"),
    (lambda c: c.pop("hidden_size"), "lacks or garbles a NanoChat setting"),
])
def test_import_refuses_a_config_our_gpt_cannot_express(exported, tmp_path, edit, message):
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_hf_directory(edited_copy(exported, tmp_path, edit), torch.device("cpu"))


def test_import_refuses_a_truncated_safetensors_file(exported, tmp_path):
    directory = edited_copy(exported, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ExportError, match="model.safetensors is truncated: its header promises"):
        load_hf_directory(directory, torch.device("cpu"))
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(ExportError, match="truncated or not a safetensors file"):
        load_hf_directory(directory, torch.device("cpu"))


def test_import_refuses_weights_that_do_not_fit_the_config(exported, tmp_path):
    directory = edited_copy(exported, tmp_path, lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(ExportError, match=r"lacks 6 weights .*model\.layers\.2\."):
        load_hf_directory(directory, torch.device("cpu"))


def rename_first_special_token(data: dict) -> None:
    data["added_tokens"][0]["content"] = "<|endoftext|>"


def use_gpt2_pattern(data: dict) -> None:
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"


def reverse_merges(data: dict) -> None:
    data["model"]["merges"].reverse()


@pytest.mark.parametrize(("edit", "message"), [(rename_first_special_token, "the special tokens are"),
                                               (use_gpt2_pattern, "splits text differently"),
                                               (reverse_merges, "does not follow the vocab's ranks")])
def test_import_refuses_a_tokenizer_that_is_not_ours(exported, tmp_path, edit, message):
    directory = edited_copy(exported, tmp_path)
    data = json.loads((directory / "tokenizer.json").read_text())
    edit(data)
    (directory / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match=message):
        load_hf_directory(directory, torch.device("cpu"))


def test_chat_cli_reports_a_bad_hf_directory_in_one_line(exported, tmp_path):
    directory = edited_copy(exported, tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(SystemExit) as exit_info, boundary_errors_exit():  # what `python -m scripts.chat_cli` runs under
        chat_cli.main(["--hf", str(directory), "-p", "hi", "--device-type", "cpu"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "model.safetensors is missing" in message and "\n" not in message
