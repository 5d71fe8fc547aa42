"""The compiler: capture with torch.fx, the pass pipeline, the cost model and simulator, codegen, reports."""
