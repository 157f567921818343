"""Bad input to every public entry point, by subject: an error that names the argument, the value given and
what is allowed, and no state changed (parameters, buffers, gradients, optimizer state and HAT's task state are
bit-identical afterwards; model inputs are refused before any layer runs)."""
