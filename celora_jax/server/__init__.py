"""The model-free server kernel: it sees uploaded arrays only. CE-LoRA's class mixtures
(``gmm``), distances (``similarity``) and personalized aggregation (``aggregation``), the
baselines' aggregations (``baselines``), which uploads are usable (``usable``) and the wire
format of what travels (``wire``).

Imports only the argument checks (``celora_jax._checks``) and itself: no model, task, data
or run code."""
