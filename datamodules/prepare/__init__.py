"""Write webdataset shards of images (or videos: container files or frame folders) with their raw VAE latents, labels
and caption features.

Usage::

    python -m datamodules.prepare images SRC --out DIR [--vae PATH_OR_ID] [--resolution 256] [--shard-size 1000]
        [--workers N] [--device cpu] [--latents sample|mean|moments|both-flips|none] [--dtype float32|float16]
        [--labels none|folders|list|NAMES_FILE] [--captions FILE] [--clip PATH_OR_ID] [--split train] [--seed 0]
        [--max-bad 100]
    python -m datamodules.prepare videos SRC --out DIR --frames 16 [--frame-stride 1] ... (same options)
        [--split-file trainlist01.txt --class-index classInd.txt]

Inputs (the sorted input list fixes every sample's key and shard, so reruns and worker counts give the same shards):

- ``SRC`` a folder: images (``.jpg .jpeg .png .webp .bmp``, recursive, hidden files and folders skipped) or, for
  ``videos``, every video file (``.avi .mp4 .webm .mkv``, decoded with PyAV: the ``video`` extra) and every folder
  that directly holds frame images (one video; frames in natural order: ``f2`` before ``f10``). A video's clip is
  its frames ``0, s, ..., (T - 1) s`` (``--frames T --frame-stride s``), each resized and centre cropped as images;
  a video with fewer frames is an unreadable input. With ``--labels folders`` the class is the first folder under
  ``SRC`` (``SRC/<class>/.../x.jpg``; for videos ``SRC/<class>/<video>.avi`` or ``SRC/<class>/<video>/``); for a
  list file, the first folder of each ``path``.
- ``--split-file FILE`` (videos): a UCF101 split list (``trainlist01.txt``: ``<Class>/<video>.avi <id>`` lines,
  ``testlist01.txt``: ``<Class>/<video>.avi``) naming the videos under the folder ``SRC`` to prepare.
  ``--class-index classInd.txt`` (``<id> <name>`` lines): the labels are the videos' class folders, stored as the
  file's ids minus one (0..100 for UCF101), and a split list's ids must agree with them.
- ``SRC`` a list file (``.csv``, ``.tsv`` or ``.jsonl``) with a ``path`` column (relative to the list file) and
  optionally ``label`` (a class name or an integer id; ``--labels list``) and either ``caption_feature`` (a ``.npy``
  of precomputed text features (N_cap, L, d), e.g. CLIP ViT-L/14 (N_cap, 77, 768) as upstream ZigMa uses) or
  ``caption`` text (one string, or a JSON list of strings: the image's N_cap captions), which needs ``--clip``.
- ``--labels NAMES_FILE``: class names, one per line (``<id> <name>`` lines as in UCF101's ``classInd.txt`` are read
  as the name), whose order fixes the ids; the names come from the folders (folder input) or the ``label`` column.
- ``--captions FILE``: a list file with ``path`` and ``caption_feature`` or ``caption`` columns joined to the inputs
  by path.
- ``--clip PATH_OR_ID``: encode the ``caption`` text with a CLIP text model (``zigma.text_encoder``; a local
  directory, or a hub id in the local cache unless ``--allow-download``; upstream's is openai/clip-vit-large-patch14):
  the last hidden states, 77 tokens (padded and truncated), (N_cap, 77, d) per image, computed by the worker that
  writes the image's shard. A ``caption`` column without ``--clip`` is an error; with ``--clip`` every input needs
  caption text and no ``caption_feature``.

Each sample, with key ``f"{index:08d}"`` (its position in the sorted input list):

- ``jpg`` (or ``png``): the shorter side resized to ``--resolution`` (PIL bicubic, antialiased), the centre square
  cropped (the same preprocessing as ``WebDataModule(kind="image")``), JPEG quality 95 with 4:4:4 chroma: FID reals.
  Not written for videos.
- raw, unscaled VAE latents (the model multiplies them by ``vae.scale``), float32 or float16 ``.npy``, under
  ``--latent-key`` (``latent.npy`` for images; upstream's ``frame_feature256.npy`` for videos, whatever the
  resolution, for compatibility with UCF101 shards and ``VideoWebDataModule``'s default):
  ``sample``: a posterior sample (C, h, w) as upstream stores, drawn from ``(seed, index)``;
  ``mean``: the posterior mean (C, h, w); ``moments``: ``<stem>_mean.npy`` and ``<stem>_std.npy`` (C, h, w) each
  (EDM2's practice: draw a fresh sample each epoch); ``both-flips``: posterior samples of the image and of its
  mirror image stacked (2, C, h, w) (images only); ``none``: pixels only. Videos: (T, C, h, w), frame-wise.
- ``cls``: the class id as decimal text; ``caption_feature.npy``: the caption features (N_cap, L, d) in ``--dtype``;
  ``src.txt``: the input's path relative to ``SRC`` (or to the list file).

Shards are ``DIR/{split}-{000000..}.tar``, ``--shard-size`` inputs each; each is written under a temporary name unique
to the writing process (``.<name>.<pid>-<random>.tmp``) and renamed when complete. A rerun skips shards whose final
file is whole (its end-of-archive marker is there, and it holds the samples the manifest recorded for it) and rewrites
the others, so an interrupted run resumes and a damaged or cut shard is rewritten, its inputs not blamed; it removes
the temporary files of processes that no longer run. Settings or inputs that differ from the directory's manifest are
refused. Worker processes (``--workers N``) end with the process that started them, however it ends (SIGKILL too).
Unreadable inputs are logged with their path and skipped, up to ``--max-bad`` in all; one more stops the run with an
error. ``DIR/manifest.json`` (``datamodules.manifest``: its schema) records the settings, the VAE's
``config()``, the caption encoder's ``config()`` (``caption_encoder``, with ``--clip``), the classes, shapes and
per-shard sample counts.

Modules: ``inputs`` (the sorted input list), ``encoding`` (VAE latents, caption features), ``writing`` (one shard,
atomically; the resume check of a shard already written; worker processes), ``driver`` (:func:`prepare`), ``cli``
(the command line, ``main(argv)``).
"""

from datamodules.prepare.cli import main, prepare_from_argv
from datamodules.prepare.driver import prepare
from datamodules.prepare.encoding import encode_latents, sample_generator, to_pixels
from datamodules.prepare.inputs import Item, list_inputs
from datamodules.prepare.writing import Options, write_shard

__all__ = [
    "Item",
    "Options",
    "encode_latents",
    "list_inputs",
    "main",
    "prepare",
    "prepare_from_argv",
    "sample_generator",
    "to_pixels",
    "write_shard",
]
