"""twigbench inside lmms-eval: every method and decoding choice as the lmms-eval model `twigbench`
(`model.TwigbenchLMM`, registered through the `lmms_eval.models` entry point: `manifest.MANIFEST`),
and the embedded benchmark as an lmms-eval task (`tasks.export_shapes`).

Only lmms-eval imports `model`; the rest of the harness never needs lmms-eval installed.
"""
