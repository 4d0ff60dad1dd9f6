package render

import (
	"errors"
	"strings"
	"testing"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

func TestLeaseAPIParams(t *testing.T) {
	for _, tc := range []struct {
		params map[string]string
		limits Limits
		api    bool
		tasks  int
		bad    bool
	}{
		{params: nil, tasks: DefaultMaxTasks},
		{params: map[string]string{LeaseAPIParam: "true"}, api: true, tasks: DefaultMaxTasks},
		{params: map[string]string{LeaseAPIParam: "true", MaxTasksParam: "0"}, api: true, tasks: 0},
		{params: map[string]string{LeaseAPIParam: "true", MaxTasksParam: "9"}, api: true, tasks: 9},
		{params: map[string]string{LeaseAPIParam: "true"}, limits: Limits{MaxTasks: 2}, api: true, tasks: 2},
		{params: map[string]string{LeaseAPIParam: "true", MaxTasksParam: "3"}, limits: Limits{MaxTasks: 2}, bad: true},
		{params: map[string]string{LeaseAPIParam: "true", MaxTasksParam: "17"}, bad: true},
		{params: map[string]string{LeaseAPIParam: "true", MaxTasksParam: "-1"}, bad: true},
		{params: map[string]string{LeaseAPIParam: "yes"}, bad: true},
		{params: map[string]string{MaxTasksParam: "2"}, bad: true},
	} {
		s, err := ParseSpecWithin(tc.params, tc.limits)
		if tc.bad {
			if !errors.Is(err, ErrInvalidSpec) {
				t.Errorf("%v within %+v: %v, want ErrInvalidSpec", tc.params, tc.limits, err)
			}
			continue
		}
		if err != nil || s.LeaseAPI != tc.api || s.MaxTasks != tc.tasks {
			t.Errorf("%v within %+v: api %v tasks %d (%v), want %v %d", tc.params, tc.limits, s.LeaseAPI, s.MaxTasks, err, tc.api, tc.tasks)
		}
	}
	if !IsParam(LeaseAPIParam) || !IsParam(MaxTasksParam) {
		t.Error("the lease socket's parameters would go to the provider")
	}
}

func TestRenderVolumePutsTasksUnderTheirDirectory(t *testing.T) {
	s, err := ParseSpecWithin(map[string]string{LeaseAPIParam: "true"}, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	main := provider.Lease{ID: "m", Values: map[string]string{"password": "p0"}}
	tasks := map[string]provider.Lease{"b": {ID: "b", Values: map[string]string{"password": "p2"}}, "a": {ID: "a", Values: map[string]string{"password": "p1"}}}
	files, err := s.RenderVolume(main, tasks)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range files {
		got = append(got, f.Path+"="+string(f.Data))
	}
	want := "password=p0 tasks/a/password=p1 tasks/b/password=p2"
	if g := strings.Join(got, " "); g != want {
		t.Errorf("files %s, want %s", g, want)
	}
	// A withdrawn volume: no lease of its own.
	if files, err := s.RenderVolume(provider.Lease{}, nil); err != nil || len(files) != 0 {
		t.Errorf("nothing to render gave %d files, %v", len(files), err)
	}
	// A class file named like the tasks' directory.
	if _, err := s.RenderVolume(provider.Lease{ID: "m", Values: map[string]string{"tasks": "x"}}, nil); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("a file named tasks: %v", err)
	}
}
