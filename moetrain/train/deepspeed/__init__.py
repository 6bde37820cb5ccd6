"""``engine=deepspeed``: the DeepSpeed JSON (:mod:`.config`), the train module (:mod:`.module`) and its
checkpoint files (:mod:`.checkpoint`). Only :mod:`.module` imports ``deepspeed`` at its top."""
