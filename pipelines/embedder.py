"""The embedding step of the ETL: a callable class Ray Data runs in an actor pool.

``Embedder`` loads the CLIP once (``unclip.clip.Clip.load``) and turns a decoded batch
(``pipelines.decode.DECODED_SCHEMA``) into schema-v1 columns: L2-normalised ``text_emb`` and
``image_emb`` as ``fixed_size_list<float32>[D]``, ``text_tokens`` as the stripped ids, the
source metadata ``url``/``width``/``height`` passed through, plus
``stage``/``error`` (rows that failed upstream pass through, not embedded) and ``warning``
(set when a caption was truncated to the CLIP context).

On CPU with ``threads`` > 1 a batch is split into that many slices embedded in parallel
threads, one torch thread each (torch releases the GIL inside its kernels), rather than
one forward with ``threads`` intra-op threads. On an idle machine both are about as fast,
but the actor shares its cores with the decode tasks, and intra-op threads wait for each
other at every operator: one preempted thread stalls the rest. ``bench/bench_embed_threads.py``
(2 cores, small CLIP, ms/row): idle, 1 thread 1.80, 2 intra-op 0.99, 2 slices 1.05; with
another process busy on one core, 1 thread 2.24, 2 intra-op 5.21, 2 slices 1.97.

torch and the CLIP are imported in the actor, not when this module is: the ETL's driver
imports the class to hand it to Ray Data and needs neither. With ``device="cuda"`` the actor
runs on the GPU Ray assigned it (``infra.gpus.ray_device``), and fails with a clear message
where that node has no usable CUDA.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.table import WARNING_PREFIX, embedding_array, tokens_array

MIN_SLICE_ROWS = 16  # smaller slices cost more in per-call overhead than they gain


class Embedder:
    """Callable class for ``map_batches(..., batch_format="pyarrow")``."""

    def __init__(
        self, clip: str, pretrained: str = "", threads: int = 0, device: str = "cpu"
    ) -> None:
        import torch

        from unclip.clip import Clip

        if device != "cpu":  # the GPU Ray assigned this actor, never any visible one
            from infra.gpus import ray_device

            device = str(ray_device("an unclip embed worker"))
        self.slices = threads if threads > 1 and device == "cpu" else 1
        if self.slices > 1:
            torch.set_num_threads(1)
            self.pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
                self.slices, thread_name_prefix="embed"
            )
        else:
            self.pool = None
            if threads > 0:
                torch.set_num_threads(threads)
        self.clip = Clip.load(clip, pretrained, device=device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        k = min(self.slices, batch.num_rows // MIN_SLICE_ROWS)
        if self.pool is None or k < 2:
            return self.embed(batch)
        step = -(-batch.num_rows // k)
        parts = [batch.slice(i, step) for i in range(0, batch.num_rows, step)]
        return pa.concat_tables(self.pool.map(self.embed, parts))

    def embed(self, batch: pa.Table) -> pa.Table:
        """``forward`` over ``batch``; if it raises, the batch is embedded again in halves
        down to single rows, and a row that still raises becomes an ``embed`` error row with
        the exception's message: one row never fails a batch (or the job)."""
        try:
            return self.forward(batch)
        except Exception as e:  # noqa: BLE001 - whatever a row raises is that row's error
            if batch.num_rows <= 1:
                return self.failing(batch, f"{type(e).__name__}: {e}")
        half = batch.num_rows // 2
        return pa.concat_tables([self.embed(batch.slice(0, half)), self.embed(batch.slice(half))])

    def forward(self, batch: pa.Table) -> pa.Table:
        """One forward pass over ``batch`` (the rows that failed upstream pass through); a
        row whose embedding is not finite becomes an ``embed`` error row."""
        import torch

        ident = self.clip.identity
        n, dim, size = batch.num_rows, ident.embed_dim, ident.image_size
        good = pc.is_null(batch.column("stage")).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(good)
        text_emb = np.zeros((n, dim), np.float32)
        image_emb = np.zeros((n, dim), np.float32)
        tokens: list[list[int]] = [[] for _ in range(n)]
        warning: list[str | None] = [None] * n
        if len(idx):
            captions = batch.column("caption").take(pa.array(idx)).to_pylist()
            ids, truncated = self.clip.tokenize(captions)
            text_emb[idx] = self.clip.encode_text(ids).cpu().numpy()
            for j, row in zip(idx, self.clip.strip_tokens(ids), strict=True):
                tokens[j] = row
            for j, cut in zip(idx, truncated, strict=True):
                if cut:
                    warning[j] = (
                        f"{WARNING_PREFIX}caption longer than the CLIP context of "
                        f"{ident.context_length} tokens; truncated"
                    )
            pixels = batch.column("pixels").take(pa.array(idx)).to_pylist()
            arr = np.frombuffer(bytearray(b"".join(pixels)), np.uint8).reshape(
                len(idx), size, size, 3
            )
            images = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            image_emb[idx] = self.clip.encode_images(images).cpu().numpy()
        bad = ~(np.isfinite(text_emb).all(1) & np.isfinite(image_emb).all(1))
        failed = {int(j): "embedding is not finite" for j in np.flatnonzero(bad & good)}
        return self._table(batch, text_emb, image_emb, tokens, warning, failed)

    def failing(self, batch: pa.Table, message: str) -> pa.Table:
        """``batch`` with every row not already failed upstream as an ``embed`` error."""
        n, dim = batch.num_rows, self.clip.identity.embed_dim
        upstream = pc.is_null(batch.column("stage")).to_numpy(zero_copy_only=False)
        zeros = np.zeros((n, dim), np.float32)
        failed = {int(j): message for j in np.flatnonzero(upstream)}
        return self._table(batch, zeros, zeros.copy(), [[] for _ in range(n)], [None] * n, failed)

    @staticmethod
    def _table(
        batch: pa.Table,
        text_emb: np.ndarray,
        image_emb: np.ndarray,
        tokens: list[list[int]],
        warning: list[str | None],
        failed: dict[int, str],
    ) -> pa.Table:
        """The output columns; rows in ``failed`` become ``embed`` errors (zero embeddings)."""
        stage, error = batch.column("stage"), batch.column("error")
        if failed:
            rows = list(failed)
            text_emb[rows], image_emb[rows] = 0.0, 0.0
            stage_l, error_l = stage.to_pylist(), error.to_pylist()
            for j, message in failed.items():
                stage_l[j], error_l[j], tokens[j], warning[j] = "embed", message, [], None
            stage, error = pa.array(stage_l, pa.string()), pa.array(error_l, pa.string())
        return pa.table(
            {
                "id": batch.column("id"),
                "caption": batch.column("caption"),
                "source": batch.column("source"),
                "image": batch.column("image"),
                "text_emb": embedding_array(text_emb),
                "image_emb": embedding_array(image_emb),
                "text_tokens": tokens_array(tokens),
                "url": batch.column("url"),
                "width": batch.column("width"),
                "height": batch.column("height"),
                "stage": stage,
                "error": error,
                "warning": pa.array(warning, pa.string()),
            }
        )
