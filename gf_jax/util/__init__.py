"""Small pieces every layer may use: file I/O for local paths and URLs (``paths``), progress bars
(``progress``), the text-file check (``textcheck``), config-section helpers (``settings``) and the
one-sentence ending of a command (``commands``). Nothing here imports another part of gf_jax."""
