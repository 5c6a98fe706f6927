//go:build tools

// Package tools pins the containerd commands that hack/tools/build.sh builds for the real node
// (Kubernetes 1.36 needs containerd 2).
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
