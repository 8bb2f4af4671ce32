"""The procedural "shapes" dataset: vocabulary, renderer, captions and the attribute oracle."""
