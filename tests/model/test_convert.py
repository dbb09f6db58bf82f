"""Converting checkpoints of LLaVA's original layout (the released LLaVA-Med v1.5's): a tiny model is saved
the way LLaVA's code saves one, converted, and judged against the original weights run by hand (float64:
transformers' Mistral and CLIP, the projector and the splice written out here, as LLaVA computes them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch
from PIL import Image
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from llavamed_fast.data.packing import Sample, collate
from llavamed_fast.data.templates import Message
from llavamed_fast.model import load_pretrained
from llavamed_fast.model.convert import ConversionError, convert_llava

VOCAB = 300
QUESTION = "What does the scan show?"
CORPUS = [
    "What does the scan show? The chest radiograph shows a right pleural effusion.",
    "[INST] Is there a fracture? [/INST] No fracture is seen. </s>",
    "Axial CT of the abdomen with contrast; the liver is enlarged with a hypodense lesion.",
] * 20


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE without <image> or a pad token, as LLaMA/Mistral tokenizers come."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _sentencepiece_model(directory: Path, *, legacy: bool = True) -> int:
    """A SentencePiece BPE model with byte fallback and LLaMA's tokenizer_config, as the released LLaVA-Med
    v1.5 ships its tokenizer (tokenizer.model, no tokenizer.json). Returns the vocabulary's size."""
    model = sp_pb2.ModelProto()
    model.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False  # as LLaMA's and Mistral's
    Piece = sp_pb2.ModelProto.SentencePiece
    pieces = [("<unk>", Piece.UNKNOWN), ("<s>", Piece.CONTROL), ("</s>", Piece.CONTROL)]
    pieces += [(f"<0x{b:02X}>", Piece.BYTE) for b in range(256)]
    words = sorted({w for line in CORPUS for w in line.split()})
    chars = sorted({c for w in words for c in w})
    pieces += [(p, Piece.NORMAL) for p in ["\u2581", *chars, *("\u2581" + c for c in chars)]]
    pieces += [("\u2581" + w, Piece.NORMAL) for w in words if len(w) > 1]
    for rank, (piece, kind) in enumerate(pieces):
        entry = model.pieces.add()
        entry.piece, entry.type, entry.score = piece, kind, -float(rank)
    (directory / "tokenizer.model").write_bytes(model.SerializeToString())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": legacy,
    }
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, **special}))
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    return len(pieces)


class Original:
    """A tiny LLaVA-Mistral checkpoint as LLaVA's code saves one, and its parts as modules (the reference).

    As released: a transformers-4.36 config.json (``rope_theta`` at the top level, here not the default;
    an ``rms_norm_eps`` that is not the default either), the CLIP tower under
    ``model.vision_tower.vision_tower.vision_model.*``, a stale ``rotary_emb.inv_freq`` buffer.
    """

    def __init__(
        self,
        root: Path,
        *,
        store_tower: bool = True,
        shards: int = 2,
        sentencepiece: bool = False,
        linear: bool = False,
        legacy: bool = True,
        v0: bool = False,
        name: str = "llava-med-tiny",
    ) -> None:
        torch.manual_seed(0)
        self.dir = root / name
        self.dir.mkdir(parents=True)
        if sentencepiece:
            vocab = _sentencepiece_model(self.dir, legacy=legacy)
        else:
            self.tokenizer = _tokenizer()
            if v0:  # LLaVA v0 added its image tokens to LLaMA's vocabulary
                self.tokenizer.add_tokens(["<im_patch>", "<im_start>", "<im_end>"], special_tokens=True)
            self.tokenizer.save_pretrained(self.dir)
            vocab = len(self.tokenizer)
        text_fields = {
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-6,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
        }
        if v0:
            text_fields.pop("sliding_window")
            self.text = LlamaForCausalLM(LlamaConfig(**text_fields)).eval()
        else:
            self.text = MistralForCausalLM(MistralConfig(**text_fields)).eval()
        vision_config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
            projection_dim=32,
        )
        self.vision = CLIPVisionModel(vision_config).eval()
        self.tower_dir = root / "clip-tiny"  # what mm_vision_tower names: LLaVA trained on a local tower
        self.vision.save_pretrained(self.tower_dir)
        self.linear_1 = torch.nn.Linear(32, 64)
        self.linear_2 = None if linear else torch.nn.Linear(64, 64)
        state = {"model." + k: v for k, v in self.text.model.state_dict().items()}
        state["lm_head.weight"] = self.text.lm_head.weight
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # older transformers saved it
        if linear:
            state["model.mm_projector.weight"] = self.linear_1.weight
            state["model.mm_projector.bias"] = self.linear_1.bias
        else:
            for index, layer in (("0", self.linear_1), ("2", self.linear_2)):
                state[f"model.mm_projector.{index}.weight"] = layer.weight
                state[f"model.mm_projector.{index}.bias"] = layer.bias
        if store_tower:
            for k, v in self.vision.state_dict().items():
                state["model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model.")] = v
        self.state = {k: v.detach().clone().contiguous() for k, v in state.items()}
        self.save(shards)
        self.config = {
            **text_fields,
            "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
            "architectures": ["LlavaMistralForCausalLM"],
            "model_type": "llava" if v0 else "llava_mistral",
            "transformers_version": "4.36.2",
            "torch_dtype": "float32",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "mm_vision_tower": str(self.tower_dir),
            "mm_hidden_size": 32,
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_projector_type": "linear" if linear else "mlp2x_gelu",
            "image_aspect_ratio": "pad",
            "mm_use_im_start_end": v0,
            "mm_use_im_patch_token": v0,
            "tokenizer_model_max_length": 2048,
            "tokenizer_padding_side": "right",
            "feature_outs": "encoder+decoder",  # a leftover field of the released config
        }
        self.write_config()

    def as_delta(self, base: Path) -> None:
        """Store the LLM's weights as deltas over a random base LLaMA (saved to ``base``, without the
        image tokens' rows), as LLaVA-Med v0 was released."""
        config = LlamaConfig(**{**self.text.config.to_dict(), "vocab_size": VOCAB})
        base_model = LlamaForCausalLM(config)
        base_model.save_pretrained(base)
        for name, weight in base_model.state_dict().items():
            self.state[name] = self.state[name].clone()
            self.state[name][: weight.shape[0]] -= weight
        self.save(1)

    def save(self, shards: int, *, pickle: bool = False) -> None:
        """safetensors files as released, or PyTorch's pickled ``pytorch_model*.bin`` as older LLaVA saved."""
        names = sorted(self.state)
        kind, suffix = ("pytorch_model", "bin") if pickle else ("model", "safetensors")

        def write(tensors: dict[str, torch.Tensor], filename: str) -> None:
            if pickle:
                torch.save(tensors, self.dir / filename)
            else:
                save_file(tensors, self.dir / filename)

        for stale in self.dir.glob("*model*.safetensors*"):
            stale.unlink()
        if shards == 1:
            write(self.state, f"{kind}.{suffix}")
            return
        weight_map = {}
        for i in range(shards):
            group = names[i::shards]
            filename = f"{kind}-{i + 1:05d}-of-{shards:05d}.{suffix}"
            write({n: self.state[n] for n in group}, filename)
            weight_map.update(dict.fromkeys(group, filename))
        index = {"metadata": {}, "weight_map": weight_map}
        (self.dir / f"{kind}.{suffix}.index.json").write_text(json.dumps(index))

    def write_config(self, **changes) -> None:
        (self.dir / "config.json").write_text(json.dumps({**self.config, **changes}))

    @torch.no_grad()
    def logits(
        self, input_ids: torch.Tensor, image_token: int, pixel_values: torch.Tensor, layer: int = -2
    ) -> torch.Tensor:
        """LLaVA's forward in float64: the penultimate layer's patches, the projector, spliced in where the
        image token's run is (LLaVA inserts them at its one -200 placeholder)."""
        text, vision = self.text.double(), self.vision.double()
        hidden = vision(pixel_values.double(), output_hidden_states=True).hidden_states[layer][:, 1:]
        features = self.linear_1.double()(hidden)
        if self.linear_2 is not None:
            features = self.linear_2.double()(torch.nn.functional.gelu(features))
        features = features[0]
        ids = input_ids.tolist()
        start = ids.index(image_token)
        end = start + features.shape[0]
        assert set(ids[start:end]) == {image_token}
        embed = text.model.embed_tokens
        pieces = [embed(input_ids[:start]), features, embed(input_ids[end:])]
        return text(inputs_embeds=torch.cat(pieces)[None]).logits[0]


def _hf_logits(directory: Path, image: Image.Image) -> tuple[torch.Tensor, dict]:
    """transformers' own LLaVA on the converted checkpoint, float64, with its own processor's inputs."""
    inputs = _hf_inputs(directory, image)
    hf = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = hf(**{**inputs, "pixel_values": inputs["pixel_values"].double()}).logits[0]
    return logits, inputs


@pytest.fixture
def original(tmp_path) -> Original:
    return Original(tmp_path)


def _hf_inputs(directory: Path, image: Image.Image):
    processor = AutoProcessor.from_pretrained(directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=text, images=[image], return_tensors="pt", add_special_tokens=False)


def test_converted_checkpoint_computes_the_original_model(original, tmp_path, vqa_rad_images):
    done = convert_llava(original.dir, tmp_path / "converted")
    out = done.path
    # This tokenizer adds no BOS, so LLaVA's tokenization had none; the template writes one: said.
    assert len(done.notes) == 1 and "at token 0" in done.notes[0] and "legacy" not in done.notes[0]
    config = json.loads((out / "config.json").read_text())
    image_token = config["image_token_index"]
    assert image_token == VOCAB  # <image> added after the original vocabulary
    assert config["text_config"]["vocab_size"] == 320  # grown to a multiple of 64
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 1e6  # from 4.x's top-level field
    assert config["text_config"]["rms_norm_eps"] == 1e-6
    assert config["image_seq_length"] == 4 and config["vision_feature_layer"] == -2
    ours = json.loads((out / "llavamed_fast.json").read_text())["model"]
    assert ours["template"] == "mistral_instruct" and ours["image_resize"] == "pad_to_square"
    assert ours["projector"] == "mlp2x_gelu" and ours["max_length"] == 2048

    image = Image.open(vqa_rad_images[5]).convert("RGB")
    theirs, inputs = _hf_logits(out, image)
    ids = inputs["input_ids"][0]
    assert ids.tolist().count(image_token) == 4
    assert original.tokenizer.decode(ids[ids != image_token]).startswith("<s>[INST] \n" + QUESTION)
    reference = original.logits(ids, image_token, inputs["pixel_values"])
    assert theirs.shape[-1] == 320
    torch.testing.assert_close(theirs[:, :VOCAB], reference, atol=1e-10, rtol=1e-10)
    # The added rows (<image> and padding) are the mean of the original rows.
    head = LlavaForConditionalGeneration.from_pretrained(out).lm_head.weight
    torch.testing.assert_close(head[VOCAB:], original.state["lm_head.weight"].mean(0).expand(20, -1))

    # Our own loader and model (float32, packed) agree too, from the same token ids.
    model, processor = load_pretrained(out)
    encoded = processor.encode(
        [Message("user", "<image>\n" + QUESTION)], num_images=1, add_generation_prompt=True
    )
    assert encoded.input_ids.tolist() == ids.tolist()
    pixels = processor.preprocess_images([image])
    torch.testing.assert_close(pixels, inputs["pixel_values"], atol=0, rtol=0)
    batch = collate([Sample("x", encoded.input_ids, encoded.labels, encoded.image_starts, pixels)])
    with torch.no_grad():
        logits = model.eval().logits(batch)
    assert (logits[:, :VOCAB].double() - reference).abs().max().item() <= 1e-4


def test_linear_projector_and_a_layer_counted_from_the_front(tmp_path, vqa_rad_images):
    original = Original(tmp_path, linear=True, shards=1)
    # LLaVA-1's layout: a LLaMA-class model, one linear projector; hidden_states[2] of a 3-layer tower is -2.
    original.write_config(model_type="llava_llama", mm_vision_select_layer=2, image_aspect_ratio="square")
    out = convert_llava(original.dir, tmp_path / "out", template="mistral_instruct").path
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    ours = json.loads((out / "llavamed_fast.json").read_text())["model"]
    assert ours["projector"] == "linear" and ours["image_resize"] == "center_crop"
    assert ours["vision_feature_layer"] == -2
    theirs, inputs = _hf_logits(out, Image.open(vqa_rad_images[1]).convert("RGB"))
    # The same weights in LLaMA's class compute LLaMA's function: the reference runs them that way too.
    llama = LlamaForCausalLM(LlamaConfig(**original.text.config.to_dict())).eval()
    llama.load_state_dict({name: original.state[name] for name in llama.state_dict()})
    original.text = llama
    reference = original.logits(inputs["input_ids"][0], VOCAB, inputs["pixel_values"], layer=2)
    torch.testing.assert_close(theirs[:, :VOCAB], reference, atol=1e-10, rtol=1e-10)
    model, _ = load_pretrained(out)  # our loader reads the identity second layer back as one layer
    assert model.multi_modal_projector.linear_2 is None


def test_v0_delta_weights_over_a_base_llm(tmp_path, vqa_rad_images):
    original = Original(tmp_path, linear=True, shards=1, store_tower=False, v0=True)
    merged_head = original.text.lm_head.weight.detach().clone()
    original.as_delta(tmp_path / "llama-base")
    kwargs = {"vision": original.tower_dir, "template": "v0"}
    # Deltas without their base, or full weights with one, would write a model that talks nonsense.
    with pytest.raises(
        ConversionError, match=r"model.norm.weight averages 0.000, as delta weights do.*--base"
    ):
        convert_llava(original.dir, tmp_path / "alone", **kwargs)
    done = convert_llava(original.dir, tmp_path / "out", base=tmp_path / "llama-base", **kwargs)
    assert len(done.notes) == 1 and "stripped the whitespace" in done.notes[0]  # v0's old tokenizer
    out = done.path
    config = json.loads((out / "config.json").read_text())
    image_token = config["image_token_index"]
    assert image_token == VOCAB + 3  # after <im_patch>, <im_start>, <im_end>, which stay
    ours = json.loads((out / "llavamed_fast.json").read_text())["model"]
    assert ours["image_start_end"] and ours["template"] == "v0" and ours["projector"] == "linear"
    theirs, inputs = _hf_logits(out, Image.open(vqa_rad_images[4]).convert("RGB"))
    ids = inputs["input_ids"][0].tolist()
    tokenizer = AutoTokenizer.from_pretrained(out)
    start, end = tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    assert ids[ids.index(start) : ids.index(end) + 1] == [start, *[image_token] * 4, end]
    reference = original.logits(inputs["input_ids"][0], image_token, inputs["pixel_values"])
    # Base + delta in float32 rounds once: not bit-exact, far inside what a wrong sum would give.
    torch.testing.assert_close(theirs[:, : VOCAB + 3], reference, atol=2e-5, rtol=1e-5)
    # The rows added after the delta's are the mean of the merged rows, not of the deltas.
    head = LlavaForConditionalGeneration.from_pretrained(out).lm_head.weight
    torch.testing.assert_close(head[VOCAB + 3 :], merged_head.mean(0).expand(320 - VOCAB - 3, -1))
    # Our loader renders the image between <im_start> and <im_end> too.
    processor = load_pretrained(out)[1]
    encoded = processor.encode(
        [Message("user", "<image>\n" + QUESTION)], num_images=1, add_generation_prompt=True
    )
    assert encoded.input_ids.tolist() == ids

    # A base of another shape is refused before anything is written.
    other = tmp_path / "other-base"
    LlamaForCausalLM(
        LlamaConfig(**{**original.text.config.to_dict(), "vocab_size": VOCAB + 10})
    ).save_pretrained(other)
    with pytest.raises(
        ConversionError,
        match=r"--base .*other-base: (lm_head|model\.embed_tokens)\.weight is \(310, 64\), the delta's \(303, 64\)",
    ):
        convert_llava(original.dir, tmp_path / "bad", base=other, **kwargs)
    assert not (tmp_path / "bad").exists()


def test_full_weights_with_a_base_are_refused(original, tmp_path):
    with pytest.raises(
        ConversionError, match=r"model.norm.weight averages 1.000, as full weights do.*leave out --base"
    ):
        convert_llava(original.dir, tmp_path / "out", base=tmp_path / "some-llama")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("shards", "dtype"), [(1, torch.bfloat16), (3, torch.float16)])
def test_pickled_weights_and_half_precision_keep_their_values(tmp_path, shards, dtype):
    # Older LLaVA saves: pytorch_model*.bin (one file, or three with an index), in a 16-bit dtype.
    original = Original(tmp_path)
    original.state = {k: v.to(dtype) for k, v in original.state.items()}
    original.save(shards, pickle=True)
    original.write_config(torch_dtype=str(dtype).removeprefix("torch."))
    out = convert_llava(original.dir, tmp_path / "out").path
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype="auto")
    converted = model.state_dict()
    assert model.dtype == dtype and json.loads((out / "config.json").read_text())["dtype"] == str(dtype)[6:]
    # Every stored weight arrives bit for bit under its new name (rows past the vocabulary are new).
    pairs = {
        "model.layers.1.mlp.down_proj.weight": "model.language_model.layers.1.mlp.down_proj.weight",
        "model.mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": (
            "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
        ),
    }
    for theirs, ours in pairs.items():
        assert converted[ours].dtype == dtype and torch.equal(converted[ours], original.state[theirs])
    assert torch.equal(converted["lm_head.weight"][:VOCAB], original.state["lm_head.weight"])
    assert not any(tmp_path.glob("out/*.bin"))  # written as safetensors


def test_rows_past_the_tokenizer_are_kept(tmp_path):
    # Some saves pad the vocabulary beyond the tokenizer (here 5 rows): they stay, and nothing is cut.
    original = Original(tmp_path, shards=1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        original.state[name] = torch.cat([original.state[name], torch.randn(5, 64)])
    original.save(1)
    original.write_config(vocab_size=VOCAB + 5)
    out = convert_llava(original.dir, tmp_path / "out").path
    head = LlavaForConditionalGeneration.from_pretrained(out).lm_head.weight
    assert head.shape[0] == 320
    assert torch.equal(head[: VOCAB + 5], original.state["lm_head.weight"])


def test_tower_from_a_clip_folder_replaces_or_completes_the_checkpoint(tmp_path, vqa_rad_images):
    original = Original(tmp_path, store_tower=False, shards=1)
    original.write_config(mm_vision_tower="openai/clip-vit-large-patch14-336")  # not stored, not here
    with pytest.raises(ConversionError, match=r"holds no vision tower weights.*--vision"):
        convert_llava(original.dir, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConversionError, match=r"--vision .*nowhere: not a CLIP checkpoint folder"):
        convert_llava(original.dir, tmp_path / "a", vision=tmp_path / "nowhere")
    out = convert_llava(original.dir, tmp_path / "b", vision=original.tower_dir).path
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    theirs, inputs = _hf_logits(out, Image.open(vqa_rad_images[0]).convert("RGB"))
    reference = original.logits(inputs["input_ids"][0], VOCAB, inputs["pixel_values"])
    torch.testing.assert_close(theirs[:, :VOCAB], reference, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type 'mlp3x_gelu' is not supported"),
        ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature is 'cls_patch'"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres'"),
        ({"mm_vision_select_layer": 4}, "mm_vision_select_layer 4 is not a hidden state"),
        ({"mm_vision_select_layer": -5}, "mm_vision_select_layer -5 is not a hidden state"),
        ({"model_type": "llava_llama"}, "no known chat template.*--template"),
        ({"model_type": "llava"}, "no known chat template"),
        ({"model_type": "llama"}, "not a LLaVA original-layout model"),
        ({"mm_vision_tower": "someone/clip-other"}, "give --vision"),
        ({"num_hidden_layers": 3}, r"missing \['model.language_model.layers.2"),
        (
            {"intermediate_size": 96},
            r"shapes disagree with its config.json: .*mlp.down_proj.weight \(64, 128\)",
        ),
        ({"torch_dtype": "float99"}, "torch_dtype 'float99' is not a torch dtype"),
    ],
)
def test_what_cannot_convert_is_refused_by_name(original, tmp_path, changes, message):
    original.write_config(**changes)
    with pytest.raises(ConversionError, match=message):
        convert_llava(original.dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_broken_files_are_named(original, tmp_path):
    with pytest.raises(ConversionError, match="--template 'nope' is not a chat template"):
        convert_llava(original.dir, tmp_path / "out", template="nope")
    index = original.dir / "model.safetensors.index.json"
    index.write_text("{}")
    with pytest.raises(ConversionError, match=r"index\.json: not an index with a weight_map"):
        convert_llava(original.dir, tmp_path / "out")
    index.unlink()
    (original.dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"no weights \(model.safetensors"):
        convert_llava(original.dir, tmp_path / "out")


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_tokenizer_as_released(tmp_path, vqa_rad_images, legacy):
    original = Original(tmp_path, sentencepiece=True, legacy=legacy)
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(original.dir / "tokenizer.model"))
    done = convert_llava(original.dir, tmp_path / "out")
    out = done.path
    assert (out / "tokenizer.json").is_file()  # loads later without sentencepiece
    tokenizer = AutoTokenizer.from_pretrained(out)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert image_token == vocab.vocab_size() and tokenizer.pad_token == "<unk>"
    for text in (QUESTION, "The liver is enlarged; no fracture (5 mm)."):
        assert tokenizer(text, add_special_tokens=False).input_ids == vocab.encode(text)

    # LLaVA's own tokenization, from the SentencePiece model itself: each side of the image on its own.
    processor = load_pretrained(out)[1]
    messages = [Message("user", "<image>\n" + QUESTION)]
    text = processor.render(messages, add_generation_prompt=True).text.removeprefix("<s>")
    before, after = text.split("<image>")
    llava = [vocab.bos_id(), *vocab.encode(before), image_token, *vocab.encode(after)]
    ours = processor.encode(messages, num_images=1, add_generation_prompt=True).input_ids.tolist()
    ours = [t for i, t in enumerate(ours) if t != image_token or ours[i - 1] != image_token]
    assert (ours == llava) is legacy  # one pass tokenizes as LLaVA does with legacy=true only...
    assert (done.notes == []) is legacy  # ...and the conversion says so when it does not
    if not legacy:
        assert "legacy" in done.notes[0] and "\u2581" in done.notes[0]

    theirs, inputs = _hf_logits(out, Image.open(vqa_rad_images[2]).convert("RGB"))
    ids = inputs["input_ids"][0]
    assert ids[0].item() == vocab.bos_id() and ids.tolist().count(image_token) == 4
    reference = original.logits(ids, image_token, inputs["pixel_values"])
    torch.testing.assert_close(theirs[:, : vocab.vocab_size()], reference, atol=1e-10, rtol=1e-10)


def test_cli_converts_and_reports_errors_on_one_line(original, tmp_path):
    run = [sys.executable, "-m", "llavamed_fast", "convert", str(original.dir)]
    done = subprocess.run(
        [*run, "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stdout and str(tmp_path / "out") in done.stdout
    for extra, message in (
        ([], "exists and is not empty"),
        (["--template", "nope"], "is not a chat template"),
        (["--vision", str(tmp_path / "nowhere")], "not a CLIP checkpoint folder"),
    ):
        again = subprocess.run(
            [*run, "--out", str(tmp_path / "out2" if extra else tmp_path / "out"), *extra],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert again.returncode == 2 and message in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1, again.stderr
