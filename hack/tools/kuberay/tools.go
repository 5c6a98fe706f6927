//go:build tools

// Package tools pins the kuberay commands that hack/tools/build.sh builds.
package tools

import (
	_ "github.com/ray-project/kuberay/ray-operator"
)
