"""Training-loop callbacks for recurrent language models."""
from __future__ import annotations

from coursepipe.learn.loop import Callback
from coursepipe.models.rnn import set_carry


class ResetState(Callback):
    """Carry a stateful RNN's hidden state across batches; forget it at every epoch start and
    before validation (fastai's ModelResetter).

    The state is never checkpointed: each epoch starts from zeros, so a run resumed from an
    epoch-boundary checkpoint (weights, optimiser, RNG) continues exactly as the uninterrupted
    run would have.
    """
    order = 5

    def before_train(self):
        set_carry(self.learn.model, True)

    def before_validate(self):
        set_carry(self.learn.model, True)

    def after_fit(self):  # a model leaving the loop runs stateless (evaluation, export)
        set_carry(self.learn.model, False)
