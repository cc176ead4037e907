"""build-dataset's stages: ingest, scenes, segment, masking, product images, assemble (each a pure
function and the cached Prefect task around it, tasks/dataset/stage.py)."""
