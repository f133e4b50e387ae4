"""The steering methods, one folder each: an engine-free core (`core`), the in-engine adapter
(`adapter`) where the method acts inside vLLM, and its descriptor (`descriptor`), listed once in
`registry`. `base` says what a descriptor owns; `plan` turns a request into its methods' options,
engine settings and reports. A package's `__init__` imports nothing, so a core can be used
without the engine."""
