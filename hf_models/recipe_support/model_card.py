"""Model cards written from what a recipe measured.

The card is the README.md of the saved folder, so it is what a Hub user reads first. Its YAML
header holds machine-readable metadata (library, tags, datasets, and a ``model-index`` with the
real held-out numbers), and its body says what the model is for, how it was trained, and where
it falls short. ``huggingface_hub.ModelCard`` renders and validates it.
"""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

Trained by `{{ recipe }}` of the `hf_models` lesson path, a from-scratch,
Hugging Face native model zoo. Lesson {{ lesson }}.

## Results

Held-out text, whole split, non-overlapping windows of the training context:

| split | loss (nats/token) | perplexity | bits per byte | tokens |
|---|---|---|---|---|
{% for split, r in results.items() -%}
| {{ split }} | {{ "%.4f"|format(r.loss) }} | {{ "%.2f"|format(r.perplexity) }} | {{ "%.4f"|format(r.bits_per_byte) }} | {{ r.tokens }} |
{% endfor %}
{% if extra %}
{% for k, v in extra.items() -%}
- {{ k }}: {{ v }}
{% endfor %}{% endif %}
## How to use

```python
from transformers import pipeline
generator = pipeline("text-generation", model="{{ repo_hint }}", trust_remote_code=True)
print(generator("ROMEO:\\n", max_new_tokens=100, do_sample=True)[0]["generated_text"])
```

The folder carries its own modeling code (`trust_remote_code=True`); with `import hf_models`
the model types are registered and no remote code is needed.
The tokenizer alone loads anywhere with `PreTrainedTokenizerFast.from_pretrained(...)`.
(`AutoTokenizer` reads the model's `config.json` first and, without `import hf_models`, asks about
its code; `trust_remote_code=True` answers it.)

## Intended use

Teaching and research: to see what this architecture learns from a small corpus, and to use it
with the tools of the Hugging Face ecosystem (pipeline, Trainer, peft, trl). It is not meant for
any application that depends on factual, safe or fluent text.

## Training

- data: {{ dataset }}
- tokenizer: {{ tokenizer }}
{% for k, v in training.items() -%}
- {{ k }}: {{ v }}
{% endfor %}
## Limitations

{{ limitations }}
"""


def build_model_card(
    *,
    model_name: str,
    lesson: str,
    recipe: str,
    summary: str,
    dataset: str,
    tokenizer: str,
    results: dict[str, dict[str, float]],
    training: dict[str, object],
    limitations: str,
    tags: list[str] | None = None,
    extra: dict[str, object] | None = None,
    repo_hint: str | None = None,
) -> ModelCard:
    """Render the card from measured ``results`` ({split: {loss, perplexity, bits_per_byte, tokens}})."""
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type=metric,
            metric_name=metric.replace("_", " "),
            metric_value=round(float(values[metric]), 6),
        )
        for split, values in results.items()
        for metric in ("bits_per_byte", "loss", "perplexity")
    ]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        license="mit",
        language="en",
        tags=["hf_models", "from-scratch", "educational", *(tags or [])],
        datasets=[dataset],
        metrics=["bits_per_byte", "perplexity"],
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        model_name=model_name,
        lesson=lesson,
        recipe=recipe,
        summary=summary,
        dataset=dataset,
        tokenizer=tokenizer,
        results={split: _Row(**r) for split, r in results.items()},
        training=training,
        limitations=limitations,
        extra=extra or {},
        repo_hint=repo_hint or f"path/to/{model_name}",
    )


class _Row:
    def __init__(self, loss, perplexity, bits_per_byte, tokens, **_):
        self.loss, self.perplexity, self.bits_per_byte, self.tokens = loss, perplexity, bits_per_byte, tokens
