"""``engine=deepspeed``, all of it: the DeepSpeed JSON and the engine's inactive-option notes (:mod:`.config`), the
train module (:mod:`.module`), the experts shown to DeepSpeed as its MoE layers (:mod:`.moe_layers`) and its
checkpoint files (:mod:`.checkpoint`). Only :mod:`.module` and :mod:`.moe_layers` import ``deepspeed`` at their
top (the first is imported only for ``engine=deepspeed``, the second only by the first)."""
