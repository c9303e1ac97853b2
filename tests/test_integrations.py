"""Lightning and Hugging Face Transformers runs, read back through gradexp.Api()."""

from __future__ import annotations

import lightning.pytorch as L  # the test extra pins lightning and transformers: a missing one fails
import numpy as np
import torch
import transformers
from test_watch import cnn, digits, same_bits
from torch import nn

import gradexp

CLIP = 0.05


def test_lightning_logger_and_watch():
    from gradexp.integrations.lightning import GradexpLogger, GradexpWatch

    class Digits(L.LightningModule):
        def __init__(self, lr: float) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = cnn()
            self.before: dict[int, dict[str, torch.Tensor]] = {}
            self.after: dict[int, dict[str, torch.Tensor]] = {}

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def on_train_batch_start(self, batch, batch_idx):
            self.before[batch_idx] = {n: p.detach().clone() for n, p in self.named_parameters()}

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.after[batch_idx] = {n: p.detach().clone() for n, p in self.named_parameters()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    x, y = digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    logger = GradexpLogger("lightning", tags=["pl"])
    model = Digits(lr=0.05)
    trainer = L.Trainer(max_epochs=1, logger=logger, callbacks=[GradexpWatch(log="all")],
                        log_every_n_steps=2, gradient_clip_val=CLIP, accelerator="cpu", devices=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    assert logger.version == logger.experiment.id and logger.name == "lightning"
    logger.experiment.finish()

    stored = gradexp.Api().run(logger.experiment.dir)
    assert stored.config["lr"] == 0.05
    rows = [r for r in stored.history().to_pylist() if r["train_loss"] is not None]
    logged_steps = [r["step"] for r in rows]
    assert logged_steps == [1, 3, 5, 7]
    names = [n for n, _ in model.named_parameters()]
    for n in names:  # captured exactly at the steps Lightning logged
        assert stored.steps(f"grad/{n}") == logged_steps
    for step in logged_steps:
        grads = [stored.tensor(f"grad/{n}", step) for n in names]
        norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
        assert norm <= CLIP * (1 + 1e-5)  # the clipped gradients, which the step used
        for n, g in zip(names, grads):
            before, after = model.before[step][n], model.after[step][n]
            assert same_bits(stored.tensor(f"param/{n}", step), before)
            assert same_bits(stored.tensor(f"update/{n}", step), after - before)
            # SGD: the update is -lr * the logged gradient, up to the rounding of the parameter
            ulp = float(np.spacing(before.abs().max().numpy()))
            np.testing.assert_allclose(stored.tensor(f"update/{n}", step), -0.05 * g, rtol=1e-5, atol=ulp)


def test_transformers_trainer_callback(tmp_path):
    from gradexp.integrations.transformers import GradexpCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config)  # random init: no hub download

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(1)
            self.ids = torch.randint(1, 64, (48, 12), generator=g)
            self.labels = (self.ids[:, 0] > 32).long()

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                    "labels": self.labels[i]}

    class SeeClipped(transformers.TrainerCallback):  # what the optimizer step will use
        seen: dict[int, dict[str, torch.Tensor]] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.seen[state.global_step + 1] = {n: p.grad.clone() for n, p in model.named_parameters()}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=6, logging_steps=2,
        learning_rate=1e-3, max_grad_norm=0.01, report_to="none", save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0)
    see = SeeClipped()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[see, GradexpCallback("hf", log="all")])
    trainer.train()

    [stored] = gradexp.Api().runs("hf")
    assert stored.status == "finished"
    assert stored.config["trainer"]["max_steps"] == 6 and stored.config["model"]["hidden_size"] == 32
    rows = {r["step"]: r for r in stored.history().to_pylist()}
    assert [s for s, r in rows.items() if r["loss"] is not None] == [2, 4, 6]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n in names:
        assert stored.steps(f"grad/{n}") == [2, 4, 6]
        assert stored.steps(f"update/{n}") == [2, 4, 6]
    for step in (2, 4, 6):
        assert rows[step]["grad_norm"] > 0.01  # so clipping changed the gradients...
        for n in names:  # ...and the logged ones are the clipped ones the step used
            assert same_bits(stored.tensor(f"grad/{n}", step), see.seen[step][n]), (n, step)
