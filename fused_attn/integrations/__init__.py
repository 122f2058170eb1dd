"""Integrations with other libraries. Each submodule imports its library only when used:
`fused_attn.integrations.transformers.register()` makes attn_implementation="fused_attn" work in
Hugging Face transformers."""
