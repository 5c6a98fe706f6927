// Command argocd-health assesses resources' health with the Lua checks of an argocd-cm
// ConfigMap, through Argo CD's own code: the steps of
// `argocd admin settings resource-overrides health` (whose CLI is far larger to build), for
// many objects at once and with JSON output.
//
//	argocd-health --argocd-cm <configmap.yaml> < objects   (JSON objects or YAML documents)
//	argocd-health --version                                (the Argo CD and gopher-lua built in)
//
// The ConfigMap's data is taken as argocd-cm's, whatever its name: the gpumarket chart renders
// its checks into a ConfigMap of its own whose data users merge into argocd-cm. Argo CD's
// settings manager turns the resource.customizations.* keys into overrides, and gitops-engine's
// health.GetResourceHealth runs the matching script as the application controller does:
// gopher-lua (Lua 5.1) with only the base, table, package and Argo CD's safe os libraries
// unless useOpenLibs is set, the object as the global `obj` (integers as from the API server),
// a 1 s timeout, an invalid status turned into Unknown, a terminating object's health as Argo
// CD reports it.
//
// Output: one JSON line per object, {"status": ..., "message": ...} as Argo CD shows it, with
// "error" when the script failed (Argo CD then shows Unknown and the error) or when no health
// check matches the object (Argo CD shows no health; status is empty). Exit status: 0 when
// every script ran, 1 when one failed, 2 when an object had no check, 3 for bad input.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"github.com/argoproj/argo-cd/gitops-engine/v3/pkg/health"
	"github.com/argoproj/argo-cd/v3/common"
	appv1 "github.com/argoproj/argo-cd/v3/pkg/apis/application/v1alpha1"
	"github.com/argoproj/argo-cd/v3/util/lua"
	"github.com/argoproj/argo-cd/v3/util/settings"
	log "github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/yaml"
)

type result struct {
	Status  health.HealthStatusCode `json:"status"`
	Message string                  `json:"message"`
	Error   string                  `json:"error,omitempty"`
}

func main() {
	cmPath := flag.String("argocd-cm", "", "ConfigMap (YAML) whose data holds the resource.customizations keys")
	version := flag.Bool("version", false, "print the Argo CD and gopher-lua versions built in")
	flag.Parse()
	if *version {
		fmt.Println(versions())
		return
	}
	if *cmPath == "" || flag.NArg() != 0 {
		fail("usage: argocd-health --argocd-cm <configmap.yaml> < objects")
	}
	// The settings manager logs its informers at info level; only the results go out.
	log.SetLevel(log.WarnLevel)

	overrides, err := resourceOverrides(*cmPath)
	if err != nil {
		fail("%s: %v", *cmPath, err)
	}
	exit := 0
	objects := utilyaml.NewYAMLOrJSONDecoder(os.Stdin, 4096)
	for n := 1; ; n++ {
		var doc json.RawMessage
		if err := objects.Decode(&doc); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			fail("object %d on stdin: %v", n, err)
		}
		if len(doc) == 0 || string(doc) == "null" {
			continue
		}
		// As the admin command reads its file: to unstructured, integers as int64.
		obj := unstructured.Unstructured{}
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			fail("object %d on stdin: %v", n, err)
		}
		hs, err := health.GetResourceHealth(&obj, lua.ResourceHealthOverrides(overrides))
		switch {
		case err != nil:
			// hs is the Unknown status Argo CD records for a failing script.
			emit(result{Status: hs.Status, Message: hs.Message, Error: err.Error()})
			exit = max(exit, 1)
		case hs == nil:
			gvk := obj.GroupVersionKind()
			emit(result{Error: fmt.Sprintf("no health check for %s/%s in %s", gvk.Group, gvk.Kind, *cmPath)})
			exit = max(exit, 2)
		default:
			emit(result{Status: hs.Status, Message: hs.Message})
		}
	}
	os.Exit(exit)
}

// resourceOverrides loads the ConfigMap's data as argocd-cm into Argo CD's settings manager,
// over a fake clientset, as `argocd admin settings --argocd-cm-path` does.
func resourceOverrides(path string) (map[string]appv1.ResourceOverride, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	cm := &corev1.ConfigMap{}
	if err := yaml.Unmarshal(data, cm); err != nil {
		return nil, err
	}
	if cm.Kind != "ConfigMap" {
		return nil, fmt.Errorf("not a ConfigMap (kind %q)", cm.Kind)
	}
	argoMeta := func(name string) metav1.ObjectMeta {
		return metav1.ObjectMeta{
			Name: name, Namespace: "default",
			Labels: map[string]string{"app.kubernetes.io/part-of": "argocd"},
		}
	}
	argocdCM := &corev1.ConfigMap{ObjectMeta: argoMeta(common.ArgoCDConfigMapName), Data: cm.Data}
	argocdSecret := &corev1.Secret{
		ObjectMeta: argoMeta(common.ArgoCDSecretName),
		Data:       map[string][]byte{"admin.password": []byte("test"), "server.secretkey": []byte("test")},
	}
	mgr := settings.NewSettingsManager(context.Background(), fake.NewClientset(argocdSecret, argocdCM), "default")
	if err := mgr.ResyncInformers(); err != nil {
		return nil, err
	}
	return mgr.GetResourceOverrides()
}

// versions names the modules whose code judges the health: Argo CD, gitops-engine, gopher-lua.
func versions() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "argocd-health (no build info)"
	}
	out := "argocd-health"
	for _, dep := range info.Deps {
		switch dep.Path {
		case "github.com/argoproj/argo-cd/v3", "github.com/argoproj/argo-cd/gitops-engine/v3", "github.com/yuin/gopher-lua":
			out += " " + dep.Path + "@" + dep.Version
		}
	}
	return out
}

func emit(r result) {
	out := json.NewEncoder(os.Stdout)
	out.SetEscapeHTML(false)
	if err := out.Encode(r); err != nil {
		fail("%v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "argocd-health: "+format+"\n", args...)
	os.Exit(3)
}
