"""Pythia checkpoints: a local or ``s3://`` Hugging Face folder, cached once; FLOPs per batch; tiny test models."""

from __future__ import annotations

import functools
import json
import logging
import os

from cpt import pythia
from cpt.io import safe_load, storage
from cpt.io.cache import mirror

log = logging.getLogger(__name__)


def resolve_folder(spec: str) -> str:
    """A local folder holding ``config.json``; an ``s3://`` folder is copied into the cache, and copied again
    when its objects changed (``cpt.io.cache.mirror``); ``pythia:<size>`` is that architecture's folder, without
    weights (``cpt.pythia``)."""
    if spec.startswith(pythia.PREFIX):
        return pythia.folder(spec)

    def has_config(keys: list[str]) -> None:
        if "config.json" not in keys:
            raise FileNotFoundError(f"cpt.model: {spec} holds no config.json (found {len(keys)} objects)")

    if not storage.is_s3(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"cpt.model: {spec} is not a Hugging Face model folder (no config.json)")
        return spec
    return mirror(spec, "models", has_config)


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cpt.model: cannot read {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"cpt.model: {path} is not a JSON object")
    return cfg


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PAD = "<|padding|>"  # Pythia's pad token; never EOS, which stays in the loss


def check_folder(folder: str, spec: str, trust_remote_code: bool = False, need_weights: bool = True) -> None:
    """The model folder before step 0: its config, its weights, a tokenizer with EOS and pad, and no code of
    its own unless ``trust_remote_code``. Raises ``ValueError`` naming ``spec`` (the folder as configured)."""
    code = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    for name in ("config.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        data = read_config(folder) if name == "config.json" else _json(path, spec)
        if data.get("auto_map") and not trust_remote_code:
            raise ValueError(
                f"cpt.model: {spec}/{name} has an auto_map ({data['auto_map']}): loading it would run the "
                f"folder's own Python code ({', '.join(code) or 'fetched by name'}). cpt refuses that unless "
                "cpt.trust_remote_code: true"
            )
    if need_weights and not any(os.path.isfile(os.path.join(folder, w)) for w in WEIGHTS):
        raise ValueError(f"cpt.model: {spec} holds no weights (none of {', '.join(WEIGHTS)})")
    for name in sorted(os.listdir(folder)):  # pickled weights: loaded safely or refused before transformers sees them
        if name.endswith(".bin"):
            try:
                safe_load.check(os.path.join(folder, name))
            except safe_load.UnsafeCheckpointError as exc:
                raise ValueError(f"cpt.model: {spec}/{name}: {exc}") from None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, name the folder
        raise ValueError(f"cpt.model: {spec} has no usable tokenizer: {type(exc).__name__}: {exc}") from exc
    if tok.eos_token_id is None:
        raise ValueError(f"cpt.model: {spec}'s tokenizer has no EOS token (documents are separated by it)")
    if tok.convert_tokens_to_ids(PAD) in (None, tok.unk_token_id) and PAD not in tok.get_vocab():
        raise ValueError(f"cpt.model: {spec}'s tokenizer has no {PAD} token (the pad token cpt uses)")


def _json(path: str, spec: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cpt.model: cannot read {path} ({spec}): {exc}") from exc
    return data if isinstance(data, dict) else {}


def flops_per_token(cfg: dict, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a GPT-NeoX: ``6 N + 12 L d s``.

    ``N`` counts every matmul weight: layers and the (untied) output head, not the input embedding, which is
    a lookup. The second term is attention scores and values (PaLM's formula). Pythia-410M at s=2048: 2.73 GFLOP.
    """
    d, layers, ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    per_layer = 4 * d * d + 2 * d * ff  # qkv + dense, mlp in + out
    n = layers * per_layer + d * cfg["vocab_size"]
    return 6.0 * n + 12.0 * layers * d * seq_len


@functools.cache
def _hf_model_class():
    """GPT-NeoX for causal LM whose forward can take its loss without the full logits (``cpt.loss``).

    The loss is computed inside the model's own forward, so FSDP has gathered the output weight there. With
    ``loss_impl`` ``plain`` it is Hugging Face's forward, unchanged."""
    from dataclasses import dataclass

    import torch
    from transformers import GPTNeoXForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput

    from cpt import loss as fused

    @dataclass
    class SummedCrossEntropy(ModelOutput):
        ce_sum: torch.Tensor | None = None  # summed over the tokens that count
        tokens: torch.Tensor | None = None

    class CptGPTNeoXForCausalLM(GPTNeoXForCausalLM):
        loss_impl, loss_chunk = "plain", 8192

        @classmethod
        def from_config(cls, config, **kwargs):  # llm-foundry builds a from-scratch model with from_config
            for auto_only in ("trust_remote_code", "code_revision"):  # AutoModel's, not the model class's
                kwargs.pop(auto_only, None)
            return cls._from_config(config, **kwargs)

        def fused(self, device) -> str:
            return fused.resolve(self.loss_impl, device)

        def forward(self, input_ids=None, attention_mask=None, labels=None, cpt_sum_targets=None, **kwargs):
            impl = self.fused(input_ids.device) if input_ids is not None else "plain"
            if impl == "plain" or (labels is None and cpt_sum_targets is None):
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            hidden = self.gpt_neox(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            weight = self.get_output_embeddings().weight
            if labels is not None:
                return CausalLMOutputWithPast(
                    loss=fused.linear_cross_entropy(hidden, weight, labels, impl, self.loss_chunk)
                )
            total, tokens = fused.cross_entropy_sum(hidden, weight, cpt_sum_targets, self.loss_chunk)
            return SummedCrossEntropy(ce_sum=total, tokens=tokens)

    return CptGPTNeoXForCausalLM, SummedCrossEntropy


KEY = "cpt_pythia"  # CptPythia's llm-foundry registry key (pyproject.toml entry point)


def foundry_slice(folder: str, seq_len: int, section) -> dict:
    """llm-foundry's ``model`` and ``tokenizer`` for ``CptPythia`` on a local Pythia folder (``section``: ``cpt:``)."""
    model = {
        "name": KEY,
        "pretrained_model_name_or_path": folder,
        "pretrained": not section.from_scratch,  # weights only: optimizer and clock start fresh
        "attn_implementation": "sdpa",  # llm-foundry's default is eager
        "use_flash_attention_2": False,
        "trust_remote_code": section.trust_remote_code,  # llm-foundry's default is True: never implicit
        "loss_impl": section.loss.impl,  # cpt.loss: the loss without the full logits
        "loss_chunk": section.loss.chunk,
        "use_train_metrics": False,  # the train loss is logged anyway; metrics on 50k-vocab logits cost a pass
    }
    tokenizer = {
        "name": folder,
        "kwargs": {"model_max_length": seq_len, "pad_token": PAD, "trust_remote_code": section.trust_remote_code},
    }
    return {"model": model, "tokenizer": tokenizer}


@functools.cache
def _composer_model_class():
    import torch
    from composer.metrics.nlp import LanguageCrossEntropy
    from llmfoundry.eval.metrics import InContextLearningMetric
    from llmfoundry.models.hf import ComposerHFCausalLM

    from cpt import loss as fused

    hf_class, summed = _hf_model_class()

    class CptPythia(ComposerHFCausalLM):
        """llm-foundry's HF causal LM with FLOPs per batch (for throughput and MFU), a cheaper evaluation and
        the loss without the full logits (``loss_impl``, ``loss_chunk``: ``cpt.loss``).

        Evaluation logs ``LanguageCrossEntropy`` and ``LanguagePerplexity`` only, from one cross-entropy pass
        per batch (Composer would run one pass per metric, plus an argmax for token accuracy); with a fused
        loss, that pass runs chunk by chunk inside the model's forward.
        """

        model_cls = hf_class

        def __init__(self, *args, loss_impl: str = "plain", loss_chunk: int = 8192, **kwargs):
            fused.resolve(loss_impl, "cuda" if loss_impl == "liger" else "cpu")  # an unknown name fails now
            super().__init__(*args, **kwargs)
            self.model.loss_impl, self.model.loss_chunk = loss_impl, int(loss_chunk)
            keep = (LanguageCrossEntropy, InContextLearningMetric)  # perplexity, and task accuracy (cpt.eval.tasks)
            self.val_metrics = {k: v for k, v in self.val_metrics.items() if isinstance(v, keep)}
            self._ce_cache = None

        def get_metadata(self) -> dict:
            """Composer's checkpoint metadata without the tokenizer's files. cpt never reads them back (``cpt
            export`` writes Pythia's tokenizer from ``cpt/assets``), and their 50,000 merges made each checkpoint's
            pickle 2.7 MB, which the weights-only loader (``cpt.io.safe_load``) parsed in 1.7 s at every load."""
            meta = super().get_metadata()
            meta.pop("tokenizer", None)
            return meta

        def flops_per_batch(self, batch) -> float:
            ids = batch["input_ids"]
            return flops_per_token(self.model.config.to_dict(), ids.shape[1]) * ids.numel()

        def eval_forward(self, batch, outputs=None):
            ids = batch["input_ids"]
            if batch.get("mode") is not None or self.model.fused(ids.device) == "plain":
                return super().eval_forward(batch, outputs)
            self.labels = fused.shift_labels(batch.pop("labels"))  # as Composer shifts them for the metrics
            return self.model(input_ids=ids, attention_mask=batch.get("attention_mask"), cpt_sum_targets=self.labels)

        def update_metric(self, batch, outputs, metric):
            if not isinstance(metric, LanguageCrossEntropy):  # LanguagePerplexity is one too
                return super().update_metric(batch, outputs, metric)
            if isinstance(outputs, summed):
                metric.sum_loss += outputs.ce_sum.to(metric.sum_loss.device)
                metric.total_items += outputs.tokens.to(metric.total_items.device)
                _updated(metric)
                return {}
            if self._ce_cache is None or self._ce_cache[0] is not outputs:
                logits = outputs["logits"] if isinstance(outputs, dict) else outputs
                target = self.labels.to(logits.device).view(-1)
                loss = torch.nn.functional.cross_entropy(
                    logits.view(-1, logits.size(-1)), target, ignore_index=metric.ignore_index, reduction="sum"
                )
                self._ce_cache = (outputs, loss, (target != metric.ignore_index).sum())
            _, loss, items = self._ce_cache
            metric.sum_loss += loss.to(metric.sum_loss.device)
            metric.total_items += items.to(metric.total_items.device)
            _updated(metric)
            return {}

    return CptPythia


def _updated(metric) -> None:
    """What torchmetrics' ``update`` wrapper records, for a metric whose sums cpt adds itself: without it every
    evaluation warns "compute method ... was called before the update method"."""
    metric._update_count += 1
    metric._computed = None


def __getattr__(name: str):  # the entry point names cpt.model:CptPythia; built lazily (imports llm-foundry)
    if name == "CptPythia":
        return _composer_model_class()
    raise AttributeError(name)
