"""The `lmms_eval.models` entry point (pyproject.toml): lmms-eval 0.7 finds external models only
through it (a `@register_model` decorator alone is never read by its CLI). A function, so that
loading the entry point imports nothing of lmms-eval's while lmms-eval is importing its models."""


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="twigbench", simple_class_path="harness.lmms.model.TwigbenchLMM")
