"""Reading and writing the files stages exchange: JSONL, atomic outputs, images, embeddings."""

from cirkit.io.atomic import atomic_dir, atomic_write, atomic_write_json, restore_dir, safe_join
from cirkit.io.images import IMAGE_EXTENSIONS, check_size, list_images, open_image
from cirkit.io.jsonl import JsonlAppender, iter_complete, read_json, read_jsonl, read_records, write_jsonl

__all__ = [
    "IMAGE_EXTENSIONS",
    "JsonlAppender",
    "atomic_dir",
    "atomic_write",
    "atomic_write_json",
    "check_size",
    "iter_complete",
    "list_images",
    "open_image",
    "read_json",
    "read_jsonl",
    "read_records",
    "restore_dir",
    "safe_join",
    "write_jsonl",
]
