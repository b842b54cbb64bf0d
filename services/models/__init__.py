"""Model adapters: build one layer range of a model and load only that range's weights.

Entry points: :func:`services.models.registry.resolve_model` (name or directory -> ModelSource) and
:func:`services.models.registry.load_stage` (ModelSource + LayerSpan -> StageModel).
"""
