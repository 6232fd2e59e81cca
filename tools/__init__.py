"""Scripts run from the project's root (`python -m tools.NAME`): training the embedded model and
its twig, publishing it, the GPU shape check and the decode-speed table. The library (harness,
methods, reports) imports nothing from here."""
