package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/ephemeral-secrets/csi-driver/test/harness"
	"github.com/ephemeral-secrets/csi-driver/test/kubelet"
)

// memoryRounds are the memory rows alone (--only memory): the node
// plugin's, the aws node plugin's and the all-in-one's (each with an aws
// section; both optional) and the earlier commit's, measured alike (idle 1 s after their socket answers, then
// with n static volumes), one after the other, rounds times; the medians
// are reported, every sample kept in the JSON. On a shared machine the
// binaries see the same load, round by round.
type memoryRounds struct {
	Rounds    int       `json:"rounds"`
	Volumes   int       `json:"volumes"`
	Node      memory    `json:"node_median_mib"`
	AWS       *memory   `json:"aws_node_median_mib,omitempty"`
	Before    *memory   `json:"before_median_mib,omitempty"`
	NodeAll   []memory  `json:"node_samples_mib"`
	AWSAll    []memory  `json:"aws_node_samples_mib,omitempty"`
	All       *memory   `json:"all_in_one_node_median_mib,omitempty"`
	AllAll    []memory  `json:"all_in_one_node_samples_mib,omitempty"`
	BeforeAll []memory  `json:"before_samples_mib,omitempty"`
	BinaryMB  binarySet `json:"binary_mb"`
}

type binarySet struct {
	Node   float64 `json:"node"`
	AWS    float64 `json:"aws_node,omitempty"`
	All    float64 `json:"all_in_one,omitempty"`
	Before float64 `json:"before,omitempty"`
}

func runMemory(bins binaries, out string, n, rounds int, driverArgs []string) error {
	if os.Geteuid() != 0 {
		return errors.New("run as root: the driver mounts tmpfs")
	}
	if rounds < 1 {
		return errors.New("--rounds must be at least 1")
	}
	r := memoryRounds{Rounds: rounds, Volumes: n}
	var err error
	if r.BinaryMB.Node, err = sizeMB(bins.node); err != nil {
		return err
	}
	if bins.before != "" {
		if r.BinaryMB.Before, err = sizeMB(bins.before); err != nil {
			return err
		}
	}
	if bins.aws != "" {
		if r.BinaryMB.AWS, err = sizeMB(bins.aws); err != nil {
			return err
		}
	}
	if bins.all != "" {
		if r.BinaryMB.All, err = sizeMB(bins.all); err != nil {
			return err
		}
	}
	env, err := newEnv()
	if err != nil {
		return err
	}
	defer env.Close()
	classes := filepath.Join(env.Base, "classes.yaml")
	if err := os.WriteFile(classes, []byte(classesYAML), 0o600); err != nil {
		return err
	}
	awsBackends, err := writeAWSBackends(env.Base)
	if err != nil {
		return err
	}
	ctx := context.Background()
	// measure runs bin as the node plugin, as the full benchmark starts
	// it, with the backend file backends (none: "").
	measure := func(bin, name, backends string) (memory, error) {
		args := []string{"--classes-file", classes, "--audit-log", filepath.Join(env.Base, "audit.log"), "-v", "0"}
		if backends != "" {
			args = append(args, "--backend-config", backends)
		}
		args = append(args, driverArgs...)
		drv := &harness.Driver{Bin: bin, Env: env, LogFile: filepath.Join(env.Base, name+".log"), Args: args}
		if err := drv.Start(ctx); err != nil {
			return memory{}, err
		}
		defer drv.Stop()
		kube, err := kubelet.Dial(env.Endpoint(), env.KubeletDir)
		if err != nil {
			return memory{}, err
		}
		defer kube.Close()
		time.Sleep(time.Second)
		var m memory
		err = measureMemory(ctx, kube, drv, n, &m)
		return m, err
	}
	// The binaries in the order each round measures them: each's samples,
	// and its median once the rounds are done.
	rows := []struct {
		what, bin, name, backends string
		samples                   *[]memory
		median                    **memory
	}{
		{"node plugin", bins.node, "driver", "", &r.NodeAll, nil},
		{"aws node plugin", bins.aws, "driver-aws", awsBackends, &r.AWSAll, &r.AWS},
		{"all-in-one", bins.all, "driver-all", awsBackends, &r.AllAll, &r.All},
		{"before", bins.before, "before", "", &r.BeforeAll, &r.Before},
	}
	for i := range rounds {
		fmt.Printf("memory round %d of %d:", i+1, rounds)
		for _, row := range rows {
			if row.bin == "" {
				continue
			}
			fmt.Print(" ", row.what)
			m, err := measure(row.bin, row.name, row.backends)
			if err != nil {
				return fmt.Errorf("%s: %w", row.what, err)
			}
			*row.samples = append(*row.samples, m)
		}
		fmt.Println()
	}
	r.Node = median(r.NodeAll)
	for _, row := range rows {
		if row.median != nil && len(*row.samples) > 0 {
			m := median(*row.samples)
			*row.median = &m
		}
	}

	fmt.Printf("\nresident memory (MiB), median of %d rounds, %d volumes\n", rounds, n)
	fmt.Printf("%-28s %8s %8s %10s %8s %9s\n", "", "idle", "anon", "volumes", "anon", "binary")
	row := func(name string, m memory, mb float64) {
		fmt.Printf("%-28s %8.2f %8.2f %10.2f %8.2f %6.1f MB\n", name, m.Idle, m.IdleAnon, m.Volumes, m.VolumesAnon, mb)
	}
	row("node plugin "+filepath.Base(bins.node), r.Node, r.BinaryMB.Node)
	if r.AWS != nil {
		row("aws node "+filepath.Base(bins.aws), *r.AWS, r.BinaryMB.AWS)
		fmt.Printf("aws node - node plugin: RSS idle +%.2f MiB, with %d volumes +%.2f MiB, binary +%.1f MB\n",
			r.AWS.Idle-r.Node.Idle, n, r.AWS.Volumes-r.Node.Volumes, r.BinaryMB.AWS-r.BinaryMB.Node)
	}
	if r.All != nil {
		row("all-in-one "+filepath.Base(bins.all), *r.All, r.BinaryMB.All)
	}
	if r.Before != nil {
		row("before "+filepath.Base(bins.before), *r.Before, r.BinaryMB.Before)
		fmt.Printf("node plugin / before: RSS idle %.2fx, with %d volumes %.2fx, binary %.2fx\n",
			r.Node.Idle/r.Before.Idle, n, r.Node.Volumes/r.Before.Volumes, r.BinaryMB.Node/r.BinaryMB.Before)
	}
	fmt.Println()
	printTargets([]target{
		{What: "RSS idle (median)", Value: r.Node.Idle, Limit: 20, Unit: "MiB", Met: r.Node.Idle <= 20},
		{What: fmt.Sprintf("RSS with %d volumes (median)", n), Value: r.Node.Volumes, Limit: 32, Unit: "MiB", Met: r.Node.Volumes <= 32},
	})
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(out, append(data, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Println("\nwrote", out)
	return nil
}

// median is the median of each field of ms (the upper one of an even
// count).
func median(ms []memory) memory {
	pick := func(f func(memory) float64) float64 {
		v := make([]float64, len(ms))
		for i, m := range ms {
			v[i] = f(m)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	return memory{
		Idle:        pick(func(m memory) float64 { return m.Idle }),
		IdleAnon:    pick(func(m memory) float64 { return m.IdleAnon }),
		Volumes:     pick(func(m memory) float64 { return m.Volumes }),
		VolumesAnon: pick(func(m memory) float64 { return m.VolumesAnon }),
	}
}
