"""Hidden states from the serving engine (`steering.return_hidden_states`): each asked layer's
residual stream at the last prompt token, and/or the last layer's after the final norm. Not a
steering method of its own: reported, and what DiffAdapt's probe reads."""
