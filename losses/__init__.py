"""[5] SSL losses: one module per method, pure tensor functions plus a thin nn.Module holding state buffers."""
