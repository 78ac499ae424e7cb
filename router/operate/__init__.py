"""Operating the router: the supervising process (`service`), a receiving process
(`receiving`), the command (`cli`), the status page (`web`) and where a study is (`trace`)."""
