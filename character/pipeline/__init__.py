"""The command line: `character <stage>`, `character run` in the registry's order, `character config`, `review`,
`compare`."""
